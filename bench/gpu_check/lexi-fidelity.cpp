// lexi-fidelity: per-layer k on a backend against reference logits (bench/gpu_check.sh, docs/backends.md).
//
// Reads a reference file written by bench/gpu_check_prepare.py on the CPU (through the project's runtime):
//   "LEXIFID1", int32 n_prompt, n_gen, n_vocab, n_tokens x int32 token ids, n_tokens x n_vocab float32 logits
// evaluates the same tokens (the prompt as one batch, then n_gen single-token steps) with the model loaded
// as asked (-ngl, --n-cpu-moe, --cpu-moe, -ot-exps-cpu, --override-kv) and prints one JSON line: the
// experts each layer runs as loaded (llama_model_n_expert_active, the lexi patch), the k of every
// ffn_moe_topk-<il> tensor the graph computed (eval callback, a second context), and KL divergence,
// top-1 agreement and the largest logit difference against the reference. Exit 1 when a check fails.
#include "common.h"
#include "llama.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

extern "C" int32_t llama_model_n_expert_active(const struct llama_model * model, int32_t il);

struct trace_t { std::map<int, std::vector<int64_t>> k; };   // layer -> k of each topk tensor seen

static bool on_tensor(struct ggml_tensor * t, bool ask, void * ud) {
    const char * p = "ffn_moe_topk-";
    if (strncmp(t->name, p, strlen(p)) != 0) return ask ? false : true;
    if (!ask) ((trace_t *) ud)->k[atoi(t->name + strlen(p))].push_back(t->ne[0]);
    return true;
}

static void fail(const char * msg) { fprintf(stderr, "lexi-fidelity: %s\n", msg); exit(2); }

static std::vector<int> parse_ints(const char * s) {
    std::vector<int> out;
    for (const char * c = s; *c; ) { out.push_back(atoi(c)); c = strchr(c, ','); if (!c) break; ++c; }
    return out;
}

// the prompt in one batch (every position's logits), then single tokens; logits row by row into out
static bool run(llama_context * ctx, const std::vector<llama_token> & toks, int n_prompt, int n_vocab, std::vector<float> * out) {
    llama_batch b = llama_batch_init(n_prompt, 0, 1);
    b.n_tokens = n_prompt;
    for (int i = 0; i < n_prompt; ++i) {
        b.token[i] = toks[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    bool ok = llama_decode(ctx, b) == 0;
    for (int i = 0; ok && out && i < n_prompt; ++i) {
        const float * l = llama_get_logits_ith(ctx, i);
        out->insert(out->end(), l, l + n_vocab);
    }
    for (size_t i = n_prompt; ok && i < toks.size(); ++i) {
        b.n_tokens = 1; b.token[0] = toks[i]; b.pos[0] = (llama_pos) i; b.n_seq_id[0] = 1; b.seq_id[0][0] = 0; b.logits[0] = 1;
        ok = llama_decode(ctx, b) == 0;
        if (ok && out) { const float * l = llama_get_logits_ith(ctx, 0); out->insert(out->end(), l, l + n_vocab); }
    }
    llama_batch_free(b);
    return ok;
}

int main(int argc, char ** argv) {
    std::string model_path, ref_path, label = "run";
    int ngl = 0, ncmoe = 0, threads = 4;
    bool cmoe = false, ot_exps = false;
    double max_kl = 1e-2, min_top1 = 0.95;
    std::vector<int> expect;
    std::vector<llama_model_kv_override> kv;
    std::vector<llama_model_tensor_buft_override> ot;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() { if (++i >= argc) fail(("missing value after " + a).c_str()); return argv[i]; };
        if (a == "-m") model_path = next();
        else if (a == "--ref") ref_path = next();
        else if (a == "--label") label = next();
        else if (a == "-ngl") ngl = atoi(next());
        else if (a == "-ncmoe" || a == "--n-cpu-moe") ncmoe = atoi(next());
        else if (a == "-cmoe" || a == "--cpu-moe") cmoe = true;
        else if (a == "-ot-exps-cpu") ot_exps = true;    // -ot exps=CPU as llama.cpp's tools write it
        else if (a == "-t") threads = atoi(next());
        else if (a == "--max-kl") max_kl = atof(next());
        else if (a == "--min-top1") min_top1 = atof(next());
        else if (a == "--expect-counts") expect = parse_ints(next());
        else if (a == "-ov" || a == "--override-kv") { if (!string_parse_kv_override(next(), kv)) fail("bad --override-kv"); }
        else fail(("unknown option " + a).c_str());
    }
    if (model_path.empty() || ref_path.empty()) fail("usage: lexi-fidelity -m MODEL --ref REF.bin [options]");

    FILE * f = fopen(ref_path.c_str(), "rb");
    if (!f) fail("cannot open the reference file");
    char magic[8]; int32_t hdr[3];
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "LEXIFID1", 8) != 0 || fread(hdr, 4, 3, f) != 3) fail("not a LEXIFID1 file");
    const int n_prompt = hdr[0], n_gen = hdr[1], n_vocab_ref = hdr[2], n_tok = n_prompt + n_gen;
    std::vector<llama_token> toks(n_tok);
    std::vector<float> ref((size_t) n_tok * n_vocab_ref);
    if (fread(toks.data(), 4, n_tok, f) != (size_t) n_tok || fread(ref.data(), 4, ref.size(), f) != ref.size()) fail("truncated reference");
    fclose(f);

    llama_backend_init();
    ggml_backend_load_all();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = ngl;
    if (!kv.empty()) { kv.emplace_back(); kv.back().key[0] = 0; mp.kv_overrides = kv.data(); }
    if (cmoe || ot_exps) ot.push_back(llm_ffn_exps_cpu_override());
    if (ncmoe > 0) llm_add_n_cpu_ffn_overrides(ncmoe, LLM_FFN_EXPS_REGEX, ot);
    if (!ot.empty()) { ot.push_back({nullptr, nullptr}); mp.tensor_buft_overrides = ot.data(); }
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) fail("the model did not load");
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    if (n_vocab != n_vocab_ref) fail("the reference was made with another vocabulary");
    const int n_layer = llama_model_n_layer(model);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_tok + 16; cp.n_batch = cp.n_ubatch = n_prompt; cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    std::vector<float> got;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx || !run(ctx, toks, n_prompt, n_vocab, &got)) fail("decode failed");
    llama_free(ctx);

    trace_t tr;                                   // a second context that reports the topk shapes
    cp.cb_eval = on_tensor; cp.cb_eval_user_data = &tr;
    ctx = llama_init_from_model(model, cp);
    if (!ctx || !run(ctx, toks, n_prompt, n_vocab, nullptr)) fail("decode with the eval callback failed");
    llama_free(ctx);

    double kl_sum = 0, kl_max = 0, max_abs = 0; int top1 = 0;
    for (int r = 0; r < n_tok; ++r) {
        const float * a = &ref[(size_t) r * n_vocab], * b = &got[(size_t) r * n_vocab];
        double ma = a[0], mb = b[0]; int ia = 0, ib = 0;
        for (int j = 1; j < n_vocab; ++j) { if (a[j] > ma) { ma = a[j]; ia = j; } if (b[j] > mb) { mb = b[j]; ib = j; } }
        double za = 0, zb = 0;
        for (int j = 0; j < n_vocab; ++j) { za += exp(a[j] - ma); zb += exp(b[j] - mb); max_abs = fmax(max_abs, fabs(a[j] - b[j])); }
        double kl = 0;
        for (int j = 0; j < n_vocab; ++j) {
            const double la = a[j] - ma - log(za), lb = b[j] - mb - log(zb);
            kl += exp(la) * (la - lb);
        }
        kl_sum += kl; kl_max = fmax(kl_max, kl); top1 += ia == ib;
    }
    const double kl_mean = kl_sum / n_tok, top1_rate = (double) top1 / n_tok;

    bool counts_ok = true;
    std::string loaded = "[", traced = "[";
    int moe_i = 0;
    for (int il = 0; il < n_layer; ++il) {
        const int k = llama_model_n_expert_active(model, il);
        loaded += (il ? "," : "") + std::to_string(k);
        auto it = tr.k.find(il);
        int64_t tk = 0;
        if (it != tr.k.end()) {
            tk = it->second.front();
            for (int64_t x : it->second) counts_ok &= x == tk;       // every batch ran the same k
        }
        traced += (il ? "," : "") + std::to_string(tk);
        counts_ok &= tk == (k > 0 ? k : 0);
        if (k > 0 && !expect.empty()) counts_ok &= moe_i < (int) expect.size() && expect[moe_i++] == k;
    }
    if (!expect.empty()) counts_ok &= moe_i == (int) expect.size();
    loaded += "]"; traced += "]";
    const bool ok = counts_ok && kl_mean <= max_kl && top1_rate >= min_top1;
    printf("{\"label\": \"%s\", \"n_gpu_layers\": %d, \"n_cpu_moe\": %d, \"cpu_moe\": %s, \"tokens\": %d, "
           "\"counts_loaded\": %s, \"topk_traced\": %s, \"counts_ok\": %s, \"kl_mean\": %.3e, \"kl_max\": %.3e, "
           "\"top1\": %.4f, \"max_abs_logit\": %.4e, \"max_kl\": %g, \"min_top1\": %g, \"ok\": %s}\n",
           label.c_str(), ngl, ncmoe, (cmoe || ot_exps) ? "true" : "false", n_tok, loaded.c_str(), traced.c_str(),
           counts_ok ? "true" : "false", kl_mean, kl_max, top1_rate, max_abs, max_kl, min_top1, ok ? "true" : "false");
    llama_model_free(model);
    return ok ? 0 : 1;
}
