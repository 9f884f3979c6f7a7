# Installs some of llama.cpp's own programs into the wheel next to libllama and libggml (llama_cpp/lib, RPATH
# $ORIGIN), so they run the patched tree (loop plans through --override-kv) with the same flags and the same
# libraries as the Python binding:
#
# - rpc-server (tools/rpc, target ggml-rpc-server): this machine's devices for a model split over
#   machines (`ggufloop rpc-server`, `--rpc`);
# - llama-perplexity: perplexity and KL divergence, the independent oracle of `ggufloop perplexity`;
# - llama-quantize: the requantizations of the quantization scale (docs/reproduction/kld.md);
# - llama-bench: prompt and generation throughput under a plan;
# - llama-completion: one prompt, non-interactively, under a plan;
# - llama-server: llama.cpp's OpenAI-compatible server, without its web UI (LLAMA_BUILD_UI and
#   LLAMA_USE_PREBUILT_UI off: the UI is an npm-built app, and nothing is downloaded at build time);
# - llama-cli: llama.cpp's chat program (built on the server's library; `-p PROMPT -st` runs one turn).
# - test-loop (tests/test-loop.cpp, patch 0009): llama.cpp's own test of a layer schedule against the physically
#   duplicated file, in C (tests/test_tools.py runs it on the tiny models); built here because LLAMA_BUILD_TESTS,
#   which would build it too, builds every other test as well.
#
# build.py turns llama.cpp's tools on (LLAMA_BUILD_TOOLS, LLAMA_BUILD_SERVER) and passes this file as
# CMAKE_PROJECT_llama_cpp_INCLUDE, so CMake includes it right after project(llama_cpp) in llama-cpp-python's
# CMakeLists.txt. The targets do not exist yet at that point, so the work is deferred to the end of that file:
# every other target of llama.cpp's tools/ is left out of the build (EXCLUDE_FROM_ALL), and the programs above
# are installed with the libraries they link (upstream splits each program into a library and a main).
cmake_language(DEFER CALL _ggufloop_tools)

function(_ggufloop_tools)
    if (EMSCRIPTEN OR NOT TARGET ggml)
        return()
    endif()
    set(programs ggml-rpc-server llama-perplexity llama-quantize llama-bench llama-completion llama-server llama-cli)
    set(libraries llama-common mtmd llama-perplexity-impl llama-quantize-impl llama-bench-impl
                  llama-completion-impl llama-server-impl llama-cli-impl)
    set(needed ${programs} ${libraries} server-context llama-ui llama-ui-assets)
    set(tools ${CMAKE_SOURCE_DIR}/vendor/llama.cpp/tools)
    get_property(dirs DIRECTORY ${tools} PROPERTY SUBDIRECTORIES) # those tools/CMakeLists.txt added here
    foreach(dir IN LISTS dirs)
        get_property(targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
        foreach(target IN LISTS targets)
            if (NOT target IN_LIST needed)
                set_target_properties(${target} PROPERTIES EXCLUDE_FROM_ALL TRUE)
            endif()
        endforeach()
    endforeach()
    foreach(target IN LISTS programs libraries)
        llama_cpp_python_install_target(${target})
    endforeach()
    if (NOT TARGET test-loop)
        add_executable(test-loop ${CMAKE_SOURCE_DIR}/vendor/llama.cpp/tests/test-loop.cpp)
        target_link_libraries(test-loop PRIVATE llama)
    endif()
    llama_cpp_python_install_target(test-loop)
endfunction()
