# Builds two of llama.cpp's own programs inside llama-cpp-python's CMake build and installs them into
# the wheel next to libllama and libggml (llama_cpp/lib, RPATH $ORIGIN), so they run the patched tree
# (loop plans through --override-kv) with the same flags and the same libraries as the Python binding:
#
# - rpc-server (tools/rpc, target ggml-rpc-server): this machine's devices for a model split over
#   machines (`ggufloop rpc-server`, `--rpc`);
# - llama-perplexity (tools/perplexity): perplexity and KL divergence, the independent oracle of
#   `ggufloop perplexity`. It needs llama.cpp's `common` library, which llama-cpp-python's build
#   compiles anyway (it forces LLAMA_BUILD_COMMON on); the hook installs it beside the program.
#
# build.py passes this file as CMAKE_PROJECT_llama_cpp_INCLUDE, so CMake includes it right after
# project(llama_cpp) in llama-cpp-python's CMakeLists.txt. The targets do not exist yet at that
# point, so the work is deferred to the end of that file. The targets are those of
# vendor/llama.cpp/tools/{rpc,perplexity}/CMakeLists.txt, declared here because CMake refuses
# add_subdirectory in a deferred call (llama.cpp adds tools/ only with LLAMA_BUILD_TOOLS, which builds
# them all); llama-perplexity is one executable here, where upstream splits it into a library and a main.
cmake_language(DEFER CALL _ggufloop_tools)

function(_ggufloop_tools)
    if (EMSCRIPTEN OR NOT TARGET ggml)
        return()
    endif()
    set(tools ${CMAKE_SOURCE_DIR}/vendor/llama.cpp/tools)
    if (GGML_RPC)
        add_executable(ggml-rpc-server ${tools}/rpc/rpc-server.cpp)
        target_link_libraries(ggml-rpc-server PRIVATE ggml)
        target_compile_features(ggml-rpc-server PRIVATE cxx_std_17)
        llama_cpp_python_install_target(ggml-rpc-server)
    endif()
    if (TARGET llama-common AND TARGET llama)
        find_package(Threads REQUIRED)
        add_executable(llama-perplexity ${tools}/perplexity/perplexity.cpp ${tools}/perplexity/main.cpp)
        target_link_libraries(llama-perplexity PRIVATE llama-common llama Threads::Threads)
        target_compile_features(llama-perplexity PRIVATE cxx_std_17)
        llama_cpp_python_install_target(llama-common)
        llama_cpp_python_install_target(llama-perplexity)
    endif()
endfunction()
