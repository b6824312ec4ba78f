"""llama.cpp (llama-cpp-python) on the same token ids as the engine, one prompt at a time.

Run by `scylla peers` with .peers/llamacpp/bin/python: python llamacpp_runner.py REQUEST OUT.
Decode-only time starts when the first token is out (prefill and first token excluded, as
llama.cpp's own eval speed), end-to-end time includes the prefill."""
import json
import sys
import time


def load(request):
    from llama_cpp import Llama

    return Llama(model_path=request["gguf"], n_ctx=request["n_ctx"], n_threads=request["threads"],
                 n_threads_batch=request["threads"], seed=request["seed"], verbose=False,
                 draft_model=lookup_draft(request))


def lookup_draft(request):
    """llama-cpp-python's only draft through its Python API: prompt lookup (n-gram copying)."""
    if request.get("draft") != "lookup":
        return None
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    return LlamaPromptLookupDecoding(num_pred_tokens=request["k"])


def decode(llm, ids, request):
    stop = set(request["eos_ids"])
    greedy = request["temperature"] <= 0
    llm.reset()
    tokens, start, first = [], time.perf_counter(), None
    for tok in llm.generate(ids, temp=request["temperature"], top_k=1 if greedy else 0,
                            top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if first is None:
            first = time.perf_counter()
        tokens.append(int(tok))
        if tok in stop or len(tokens) >= request["max_new_tokens"]:
            break
    end = time.perf_counter()
    return {"tokens": tokens, "e2e_s": end - start, "first_token_s": first - start, "decode_s": end - first}


def main(request_path, out_path):
    request = json.load(open(request_path))
    llm = load(request)
    decode(llm, request["prompts"][0]["ids"][:16], {**request, "max_new_tokens": 4})   # warm-up
    with open(out_path, "a") as out:
        for prompt in request["prompts"]:
            row = decode(llm, prompt["ids"], request)
            out.write(json.dumps({"question_id": prompt["question_id"], "prompt_tokens": len(prompt["ids"]),
                                  **row}) + "\n")
            out.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
