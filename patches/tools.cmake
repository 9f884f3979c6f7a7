# Builds some of llama.cpp's own programs inside llama-cpp-python's CMake build and installs them into
# the wheel next to libllama and libggml (llama_cpp/lib, RPATH $ORIGIN), so they run the patched tree
# (loop plans through --override-kv) with the same flags and the same libraries as the Python binding:
#
# - rpc-server (tools/rpc, target ggml-rpc-server): this machine's devices for a model split over
#   machines (`ggufloop rpc-server`, `--rpc`);
# - llama-perplexity (tools/perplexity): perplexity and KL divergence, the independent oracle of
#   `ggufloop perplexity`;
# - llama-quantize (tools/quantize): the requantizations of the quantization scale (docs/reproduction/kld.md);
# - llama-bench (tools/llama-bench): prompt and generation throughput under a plan;
# - llama-completion (tools/completion): one prompt, non-interactively, under a plan (in this llama.cpp,
#   llama-cli and llama-server are built on the server's library and its web UI, which is not built here).
# The last four need llama.cpp's `common` library, which llama-cpp-python's build compiles anyway (it
# forces LLAMA_BUILD_COMMON on); the hook installs it beside them.
#
# build.py passes this file as CMAKE_PROJECT_llama_cpp_INCLUDE, so CMake includes it right after
# project(llama_cpp) in llama-cpp-python's CMakeLists.txt. The targets do not exist yet at that
# point, so the work is deferred to the end of that file. The targets are those of
# vendor/llama.cpp/tools/<tool>/CMakeLists.txt, declared here because CMake refuses add_subdirectory in
# a deferred call (llama.cpp adds tools/ only with LLAMA_BUILD_TOOLS, which builds them all, the server
# too); each program is one executable here, where upstream splits it into a library and a main.
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
        llama_cpp_python_install_target(llama-common)
        # program, its folder under tools/, its source beside main.cpp
        foreach(tool IN ITEMS "llama-perplexity;perplexity;perplexity" "llama-quantize;quantize;quantize"
                               "llama-bench;llama-bench;llama-bench" "llama-completion;completion;completion")
            list(GET tool 0 name)
            list(GET tool 1 dir)
            list(GET tool 2 source)
            add_executable(${name} ${tools}/${dir}/${source}.cpp ${tools}/${dir}/main.cpp)
            target_link_libraries(${name} PRIVATE llama-common llama Threads::Threads)
            target_compile_features(${name} PRIVATE cxx_std_17)
            llama_cpp_python_install_target(${name})
        endforeach()
    endif()
endfunction()
