// Random GGUF models of every llama.cpp architecture, for ggufloop's per-architecture tests.
//
// llama.cpp's own tests/test-llama-archs.cpp builds them: its fixture hyperparameters per
// architecture (get_gguf_ctx), its tensor initialisation (set_tensor_data) and its choice of dense
// and MoE variants. tests/archs.py compiles this file against the patched vendored tree, with the
// fixture's default depth raised so that a block can have layers before and after it.
//
//   archgen --list                        one "ARCH dense|moe" line per model that can be saved
//   archgen ARCH dense|moe SEED OUT.gguf  save one model

#define main test_llama_archs_main
#include "test-llama-archs.cpp"
#undef main

// Gemma 4, which the upstream save loop skips: its fixture lacks the per-layer sliding-window
// flags; every 5th layer is full attention, as in the Gemma 4 files. Without per-layer token
// embeddings, as the 26B and 31B models (E2B/E4B have them, and share KV across layers).
static void archgen_fix_fixture(llm_arch arch, gguf_context * ctx) {
    if (arch == LLM_ARCH_GEMMA4) {
        const std::string prefix = llm_arch_name(arch);
        const int64_t n_layer = gguf_get_val_u32(ctx, gguf_find_key(ctx, (prefix + ".block_count").c_str()));
        std::vector<int8_t> swa(n_layer);
        for (int64_t il = 0; il < n_layer; il++) {
            swa[il] = il % 5 < 4;
        }
        gguf_set_arr_data(ctx, (prefix + ".attention.sliding_window_pattern").c_str(), GGUF_TYPE_BOOL, swa.data(), swa.size());
        gguf_set_val_u32(ctx, (prefix + ".embedding_length_per_layer_input").c_str(), 0);
    }
}

static bool archgen_saved(llm_arch arch, bool moe) {
    if (arch == LLM_ARCH_UNKNOWN || arch == LLM_ARCH_EAGLE3 || arch == LLM_ARCH_DFLASH || arch == LLM_ARCH_GEMMA4_ASSISTANT) {
        return false;
    }
    if (moe ? !moe_implemented(arch) : moe_mandatory(arch)) {
        return false;
    }
    return llama_model_saver_supports_arch(arch) && arch_supported(arch) ? true : arch == LLM_ARCH_GEMMA4;
}

int main(int argc, char ** argv) {
    llama_log_set([](ggml_log_level level, const char * text, void *) {
        if (level == GGML_LOG_LEVEL_ERROR) {
            fputs(text, stderr);
        }
    }, nullptr);
    if (argc == 2 && strcmp(argv[1], "--list") == 0) {
        for (llm_arch arch : llm_arch_all()) {
            for (bool moe : { false, true }) {
                if (archgen_saved(arch, moe)) {
                    printf("%s %s\n", llm_arch_name(arch), moe ? "moe" : "dense");
                }
            }
        }
        return 0;
    }
    if (argc != 5) {
        fprintf(stderr, "usage: %s --list | ARCH dense|moe SEED OUT.gguf\n", argv[0]);
        return 2;
    }
    const llm_arch arch = llm_arch_from_string(argv[1]);
    const bool     moe  = strcmp(argv[2], "moe") == 0;
    try {
        gguf_context_ptr ctx = get_gguf_ctx(arch, moe);
        archgen_fix_fixture(arch, ctx.get());
        auto model_and_ctx = get_model_and_ctx(ctx.get(), nullptr, std::stoull(argv[3]), 0.1f, {});
        llama_model_saver ms(model_and_ctx.first.get());
        ms.add_kv_from_model();
        if (arch == LLM_ARCH_GEMMA4) {
            // the saver leaves out a zero, which the loader requires
            gguf_set_val_u32(ms.gguf_ctx, (std::string(argv[1]) + ".embedding_length_per_layer_input").c_str(), 0);
        }
        ms.add_tensors_from_model();
        ms.save(argv[4]);
    } catch (const std::exception & err) {
        fprintf(stderr, "error: %s %s: %s\n", argv[1], argv[2], err.what());
        return 1;
    }
    return 0;
}
