# Builds llama.cpp's RPC server (tools/rpc, target ggml-rpc-server) inside llama-cpp-python's own
# CMake build and installs it into the wheel next to libggml (llama_cpp/lib, RPATH $ORIGIN).
#
# build.py passes this file as CMAKE_PROJECT_llama_cpp_INCLUDE, so CMake includes it right after
# project(llama_cpp) in llama-cpp-python's CMakeLists.txt. The targets do not exist yet at that
# point, so the work is deferred to the end of that file: the server is then compiled with the
# same flags against the same patched ggml as the Python binding (one more source file to build),
# and it ships in, and is cached with, the same wheel. The target is the one of
# vendor/llama.cpp/tools/rpc/CMakeLists.txt, declared here because CMake refuses add_subdirectory
# in a deferred call (llama.cpp adds tools/ only with LLAMA_BUILD_TOOLS, which builds them all).
cmake_language(DEFER CALL _ggufloop_rpc_server)

function(_ggufloop_rpc_server)
    if (NOT GGML_RPC OR NOT TARGET ggml OR EMSCRIPTEN)
        return()
    endif()
    add_executable(ggml-rpc-server ${CMAKE_SOURCE_DIR}/vendor/llama.cpp/tools/rpc/rpc-server.cpp)
    target_link_libraries(ggml-rpc-server PRIVATE ggml)
    target_compile_features(ggml-rpc-server PRIVATE cxx_std_17)
    llama_cpp_python_install_target(ggml-rpc-server)
endfunction()
