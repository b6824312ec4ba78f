"""vLLM CPU on the same token ids as the engine: one prompt at a time, then all at once.

Run by `scylla peers` with .peers/vllm/bin/python: python vllm_runner.py REQUEST OUT. vLLM
spawns its engine process, hence the __main__ guard. Decode-only time per prompt is the
full request less a max_tokens=1 request on the same prompt (prefill and first token).
Acceptance by draft position comes from vLLM's own counters (`llm.get_metrics()`)."""
import json
import sys
import time


def load(request):
    from vllm import LLM

    spec = None
    if request.get("draft_dir"):
        spec = {"method": "eagle3", "model": request["draft_dir"], "num_speculative_tokens": request["k"]}
    return LLM(model=request["model_dir"], dtype="float32", enforce_eager=True, seed=request["seed"],
               max_model_len=request["n_ctx"], speculative_config=spec, disable_log_stats=False)


def params(request, max_tokens):
    from vllm import SamplingParams

    return SamplingParams(temperature=request["temperature"], max_tokens=max_tokens,
                          stop_token_ids=request["eos_ids"], seed=request["seed"])


def timed_generate(llm, prompts, sampling):
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, use_tqdm=False)
    return outs, time.perf_counter() - start


def acceptance(llm):
    """{num_drafts, accepted_per_pos} from vLLM's metrics (empty without a draft)."""
    found = {}
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_drafts":
            found["num_drafts"] = metric.value
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            found["accepted_per_pos"] = list(metric.values)
    return found


def main(request_path, out_path):
    request = json.load(open(request_path))
    llm = load(request)
    ids = [p["ids"] for p in request["prompts"]]
    timed_generate(llm, [ids[0][:16]], params(request, 4))   # warm-up
    with open(out_path, "a") as out:
        for prompt in request["prompts"]:
            (full,), e2e = timed_generate(llm, [prompt["ids"]], params(request, request["max_new_tokens"]))
            _, first = timed_generate(llm, [prompt["ids"]], params(request, 1))
            out.write(json.dumps({"question_id": prompt["question_id"], "prompt_tokens": len(prompt["ids"]),
                                  "tokens": list(full.outputs[0].token_ids), "e2e_s": e2e,
                                  "first_token_s": first, "decode_s": max(e2e - first, 1e-9)}) + "\n")
            out.flush()
        outs, wall = timed_generate(llm, ids, params(request, request["max_new_tokens"]))
        out.write(json.dumps({"all_at_once": True, "wall_s": wall,
                              "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                              **acceptance(llm)}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
