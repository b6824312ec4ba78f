"""`scylla ...`: generate, bench, build-corpus, train-draft, fit, sweep.

Every user-facing failure is a ScyllaError: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scylla import ScyllaError
from scylla.options import BACKENDS, DEFAULT_QUANT, QUANTS, SPLITS


class OneLineParser(argparse.ArgumentParser):
    """Usage errors on one line (the full usage stays behind --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def draft_length(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def add_decode_flags(p: argparse.ArgumentParser) -> None:

    p.add_argument("--target", default="smollm2", help="bundled 'smollm2' or a local transformers model folder")
    p.add_argument("--quant", default=DEFAULT_QUANT, choices=QUANTS,
                   help="q4: the GGUF's own 4-bit blocks on the int4 CPU kernel (default); none: the "
                        "dequantized fp32 reference; int8, nf4")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="lean", choices=BACKENDS,
                   help="lean: the engine's own fused forward (default); hf: the transformers forward (reference)")
    p.add_argument("--draft", default="ngram", help="none | ngram | layerskip:K | scylla | eagle3-style | eagle2-style | FOLDER; SPEC+ngram: SPEC, copying where the context repeats")
    p.add_argument("--k", type=draft_length, default=None,
                   help="draft a chain of this length, or 'auto': chosen per step from measured cost and "
                        "acceptance (default: 6 for ngram and layerskip; a trained head drafts a tree)")
    p.add_argument("--tree", default=None, metavar="D,K,N",
                   help="verify an EAGLE-2 draft tree of depth D, top-K expansion, N nodes (default for a "
                        "trained head without --k, one row: 2,3,5 at T = 0, 1,5,5 when sampling; "
                        "several rows: a chain, k auto)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="scylla", description="Speculative decoding and draft scaling laws")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    g = sub.add_parser("generate", help="decode one prompt with speculation; print text and per-step acceptance")
    g.add_argument("prompt")
    add_decode_flags(g)

    b = sub.add_parser("bench", help="baseline vs engine on a JSONL prompt file")
    b.add_argument("--prompts", required=True)
    b.add_argument("--limit", type=positive_int)
    b.add_argument("--split", choices=SPLITS, help="only this half of a prompt file with splits (the broad set)")
    b.add_argument("--batch-size", type=positive_int, default=1)
    b.add_argument("--json", required=True, dest="json_out")
    add_decode_flags(b)
    b.set_defaults(draft="none")

    d = sub.add_parser("compare-drafts", help="each draft at its default shape against plain decoding, one run")
    d.add_argument("--prompts", required=True)
    d.add_argument("--limit", type=positive_int)
    d.add_argument("--split", choices=SPLITS, help="only this half of a prompt file with splits (the broad set)")
    d.add_argument("--drafts", default="ngram,scylla,scylla+ngram", help="comma-separated draft specs")
    d.add_argument("--json", required=True, dest="json_out")
    d.add_argument("--quant", default=DEFAULT_QUANT, choices=QUANTS)
    d.add_argument("--max-new-tokens", type=positive_int, default=128)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("build-corpus", help="self-distilled answers + standard-library code, cached")
    c.add_argument("--prompts", type=positive_int, default=960)
    c.add_argument("--max-new-tokens", type=positive_int, default=192)
    c.add_argument("--batch", type=positive_int, default=16)
    c.add_argument("--seed", type=int, default=1, help="which generated prompt set (seed 1 is the original corpus)")
    c.add_argument("--answers", type=positive_int, metavar="N",
                   help="build the answers-v2 corpus instead: the target's answers to N prompts (magpie, "
                        "templates, long text on this machine), batched on the lean engine, resumable")
    c.add_argument("--snapshot", action="store_true",
                   help="then copy the answers-v2 corpus built so far (gzipped) into assets/corpora/")

    t = sub.add_parser("train-draft", help="train an EAGLE-style Scylla draft head")
    t.add_argument("--name", help="default: the recipe's name, else scylla")
    t.add_argument("--recipe", choices=["scylla", "eagle3-style", "eagle2-style"],
                   help="a named draft's fusion, vocabulary, TTT and architecture (the flags below "
                        "may be left out; given, they must agree)")
    t.add_argument("--tokens", type=positive_int, required=True)
    t.add_argument("--layers", type=positive_int, default=1)
    t.add_argument("--fusion", choices=["last", "multi"], help="default multi")
    t.add_argument("--draft-vocab", type=int, help="default 8192 (0: the full vocabulary)")
    t.add_argument("--ttt", type=positive_int, help="training-time test unroll steps (default 3)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--corpus", default="mix", help="answers-v2 (the target's own answers, full length) | mix | "
                                                    "answers | selfdistill | stdlib")
    t.add_argument("--max-len", type=positive_int, default=2048,
                   help="positions per training sequence (the context the draft decodes at)")
    t.add_argument("--prompt-weight", type=float, default=0.1, help="loss weight of prompt positions")
    t.add_argument("--align-tokens", type=nonnegative_int, default=0,
                   help="then a second stage on N tokens of the target's own answers (alignment)")
    t.add_argument("--arch", choices=["eagle", "eagle3"],
                   help="eagle3: EAGLE-3's first layer (one layer, multi fusion, reduced vocabulary); "
                        "exports for vLLM and SGLang (default eagle)")
    t.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="matmul precision while training (weights stay fp32); auto: bf16 where the "
                        "CPU or GPU multiplies bf16 natively")
    t.add_argument("--labels", choices=["hard", "soft"], default="soft",
                   help="soft (default): the target's distribution over the draft vocabulary, as EAGLE "
                        "trains (measured better at T = 1 and no worse at T = 0); hard: its greedy token, "
                        "what sweeps without a [train] labels key train")
    t.add_argument("--out", help="output folder (default: cache/drafts/NAME)")
    t.add_argument("--db", help="store the training record in this results.duckdb")

    e = sub.add_parser("export-draft", help="copy a trained draft (float16) into assets/drafts/NAME, or write "
                                            "it in the EAGLE-3 layout that vLLM and SGLang serve")
    e.add_argument("src", help="a draft folder or a named draft (scylla, eagle3-style, eagle2-style)")
    e.add_argument("--name", help="scylla format: the folder name under assets/drafts/")
    e.add_argument("--format", choices=["scylla", "eagle3"], default="scylla",
                   help="scylla: this project's draft folder; eagle3: config.json + model.safetensors for "
                        "vLLM and SGLang (eagle3-arch drafts only; see docs/serving.md)")
    e.add_argument("--out", help="eagle3 format: the output folder")
    e.add_argument("--force", action="store_true", help="write into an --out folder that is not empty")

    f = sub.add_parser("fit", help="fit metric = intercept + slope * ln(x) by OLS")
    f.add_argument("--db")
    f.add_argument("--axis", choices=["tokens", "layers", "batch"])
    f.add_argument("--metric", choices=["tau", "accept_rate", "speedup", "spec_gain", "throughput"])
    f.add_argument("--csv")
    f.add_argument("--x")
    f.add_argument("--y")
    f.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    f.add_argument("--json")

    s = sub.add_parser("sweep", help="run a grid of trainings and evaluations into the store")
    s.add_argument("config")
    s.add_argument("--db", default="results.duckdb")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: points run in this process (default); ray: each point is a Ray task, "
                        "this process alone writes the store")
    s.add_argument("--address", help="ray: the cluster to join (HOST:PORT or ray://HOST:PORT); "
                                     "default: start a local Ray")
    s.add_argument("--cpus-per-point", type=positive_int, default=1, help="ray: CPUs each point's task declares")

    pe = sub.add_parser("peers", help="the same prompts on llama.cpp and vLLM CPU (own venvs) and this engine; rows to the store")
    pe.add_argument("--prompts", required=True)
    pe.add_argument("--limit", type=positive_int, default=None)
    pe.add_argument("--split", choices=SPLITS, help="only this half of a prompt file with splits")
    pe.add_argument("--engines", default="scylla,llamacpp", help="comma-separated: scylla, llamacpp, vllm")
    pe.add_argument("--draft", default="scylla", help="this engine's draft; its EAGLE-3 export drafts for vLLM")
    pe.add_argument("--k", type=positive_int, default=3, help="chain length for the drafted peers (and a chain row here)")
    pe.add_argument("--max-new-tokens", type=positive_int, default=128)
    pe.add_argument("--temperature", type=float, default=0.0)
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--timeout-s", type=positive_int, default=3600, help="per peer configuration")
    pe.add_argument("--db", default=None, help="store the rows here (one transaction)")
    pe.add_argument("--json", dest="json_out", default=None)
    r = sub.add_parser("recommend", help="the draft and draft length the laws predict fastest; --check measures it")
    r.add_argument("--config", required=True, help="the sweep config whose evaluation set-up (and training) to use")
    r.add_argument("--batch", type=positive_int, default=1)
    r.add_argument("--budget-tokens", type=positive_int, required=True)
    r.add_argument("--check", action="store_true", help="train or load the draft, measure it, store the pair")
    r.add_argument("--db", default="results.duckdb")
    r.add_argument("--json", dest="json_out")
    return parser


def cmd_generate(args) -> int:
    from scylla.decoding import speculative_generate
    from scylla.drafts import make_draft
    from scylla.models import encode_prompt, load_target
    from scylla.trace import summarize

    check_flags(args)
    if not args.prompt.strip():
        raise ScyllaError("empty prompt")
    os.environ.setdefault("SCYLLA_COMPILE", "0")   # one prompt: compiling (30 s or more) would cost more than it saves
    target = load_target(args.target, args.quant, args.device, backend=args.backend)
    draft = make_draft(args.draft, target)
    ids = encode_prompt(target, args.prompt)
    steps = []
    for step in speculative_generate(target, draft, ids, args.max_new_tokens, args.k,
                                     args.temperature, args.top_p, args.seed, tree=args.tree):
        steps.append(step)
        text = target.tokenizer.decode(step.emitted)
        print(f"step {step.index:3d}  drafted {len(step.drafted)}  accepted {step.accepted}  "
              f"draft {step.draft_ms:6.1f} ms  verify {step.verify_ms:6.1f} ms  | {text!r}", file=sys.stderr)
    out = [t for s in steps for t in s.emitted]
    print(target.tokenizer.decode(out, skip_special_tokens=True))
    st = summarize(steps)
    rate = "n/a" if st.accept_rate is None else f"{st.accept_rate:.2f}"
    print(f"tau {st.tau:.2f}  accept_rate {rate}  steps {st.n_steps}  tokens {st.n_tokens}  "
          f"per-position {[round(x, 2) for x in st.per_position_accept]}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from scylla.bench import run_bench
    from scylla.data import load_prompts
    from scylla.drafts import make_draft
    from scylla.models import load_target

    check_flags(args)
    prompts = load_prompts(args.prompts, args.limit, args.split)
    target = load_target(args.target, args.quant, args.device, backend=args.backend)
    draft = make_draft(args.draft, target)
    report = run_bench(target, draft, prompts, args.max_new_tokens, args.k, args.temperature,
                       args.top_p, args.seed, args.draft, args.batch_size, tree=args.tree)
    write_json(args.json_out, report)
    print(f"tau {report['tau']:.2f}  speedup {report['speedup']:.2f}x over generate()  "
          f"spec_gain {report['spec_gain']:.2f}x over plain ({report['backend']})  "
          f"exact_match {report['exact_match_rate']}", file=sys.stderr)
    return 0


def runs_q4(args) -> str:
    """The quant the target will run, for the default draft shape (q4 falls back off the CPU)."""
    from scylla.models import pick_device

    on_cpu = pick_device(args.device) == "cpu" and args.backend == "lean"
    return "q4" if args.quant == "q4" and on_cpu else "none"


def check_flags(args) -> None:
    """Validate decoding flags before paying for a model load."""
    from scylla.decoding import check_decode_args
    from scylla.drafts import check_draft_spec, default_shape

    check_draft_spec(args.draft)
    args.k, args.tree = default_shape(args.draft, args.k, args.tree, args.temperature,
                                     getattr(args, "batch_size", 1), runs_q4(args))
    check_decode_args(args.max_new_tokens, args.temperature, args.top_p, args.k)
    if args.tree:
        from scylla.decoding import TreeShape
        from scylla.drafts import chains_only
        from scylla.proposals import no_tree_error

        args.tree = TreeShape.parse(args.tree)
        if chains_only(args.draft):
            raise no_tree_error(args.draft)


def cmd_build_corpus(args) -> int:
    from scylla.corpus import build_code, build_selfdistill
    from scylla.models import load_target

    if args.snapshot and not args.answers:
        from scylla.corpus import save_snapshot

        print(save_snapshot())
        return 0
    target = load_target()
    if args.answers:
        from scylla.corpus import build_answers, save_snapshot
        from scylla.pipeline import captured_folder

        print(build_answers(target, args.answers, args.max_new_tokens, args.batch, seed=args.seed,
                            capture_to=captured_folder(target)))
        if args.snapshot:
            print(save_snapshot())
        return 0
    print(build_code(target))
    print(build_selfdistill(target, args.prompts, args.max_new_tokens, args.batch, seed=args.seed))
    return 0


def cmd_train_draft(args) -> int:
    from scylla.pipeline import train_draft_from_args

    record = train_draft_from_args(args)
    print(json.dumps(record, indent=2))
    return 0


def cmd_export_draft(args) -> int:
    from scylla.head import export_eagle3, export_head, shipped_dir

    src = draft_source(args.src)
    if args.format == "eagle3":
        if not args.out or args.name:
            raise ScyllaError("--format eagle3 writes to --out DIR (and takes no --name)")
        print(export_eagle3(src, Path(args.out), force=args.force))
        return 0
    if not args.name or args.out:
        raise ScyllaError("export-draft needs --name NAME (the scylla format), or --format eagle3 --out DIR")
    export_head(src, shipped_dir() / args.name)
    print(shipped_dir() / args.name)
    return 0


def draft_source(spec: str) -> Path:
    """A named draft where it is shipped or trained, else a draft folder. The name wins:
    from the project root `scylla` is also the package's folder, which holds no draft."""
    from scylla.drafts import NAMED_DRAFTS
    from scylla.head import named_draft_dir

    if spec in NAMED_DRAFTS:
        return named_draft_dir(spec)
    if Path(spec).is_dir():
        return Path(spec)
    raise ScyllaError(f"{spec}: no such draft folder or named draft ({', '.join(NAMED_DRAFTS)})")


def cmd_fit(args) -> int:
    from scylla.laws import fit_command

    if not args.csv and not (args.db and args.axis and args.metric):
        raise ScyllaError("fit needs --db with --axis and --metric, or --csv with --x and --y")
    result = fit_command(args)
    for col, values in (result.get("mixed_settings") or {}).items():
        print(f"scylla: warning: the fitted points mix {col} = {values}; add --filter {col}=VALUE "
              "to fit one curve", file=sys.stderr)
    if not args.json:
        print(json.dumps(result, indent=2, default=float))
    return 0


def cmd_sweep(args) -> int:
    from scylla.sweep import sweep_command

    return sweep_command(args)


def prompt_set_name(args) -> str:
    """The stored prompt set: the file's name, and its half where one was chosen."""
    return Path(args.prompts).name + (f":{args.split}" if args.split else "")


def cmd_compare_drafts(args) -> int:
    from scylla.bench import compare_drafts
    from scylla.data import load_prompts
    from scylla.drafts import check_draft_spec
    from scylla.models import load_target

    specs = [s.strip() for s in args.drafts.split(",") if s.strip()]
    if not specs:
        raise ScyllaError("--drafts needs at least one draft spec")
    for spec in specs:
        check_draft_spec(spec)
    if args.temperature < 0:
        raise ScyllaError(f"temperature must be >= 0, got {args.temperature}")
    prompts = load_prompts(args.prompts, args.limit, args.split)
    report = compare_drafts(load_target(quant=args.quant), specs, prompts, args.max_new_tokens,
                            args.temperature, args.seed)
    write_json(args.json_out, {**report, "prompt_set": prompt_set_name(args)})
    for spec, fig in report["drafts"].items():
        print(f"{spec:>24}  tau {fig['tau']:.2f}  spec_gain {fig['spec_gain']:.2f}  "
              f"weakest kind {min(fig['by_kind'].items(), key=lambda kv: kv[1])}", file=sys.stderr)
    return 0


def cmd_peers(args) -> int:
    from scylla.data import load_prompts
    from scylla.drafts import check_draft_spec
    from scylla.models import load_target
    from scylla.peers import check_engines, compare
    from scylla.store import init_db, write_runs_atomic

    engines = check_engines([e.strip() for e in args.engines.split(",") if e.strip()])
    check_draft_spec(args.draft)
    if args.temperature < 0:
        raise ScyllaError(f"temperature must be >= 0, got {args.temperature}")
    prompts = load_prompts(args.prompts, args.limit, args.split)
    if args.db:
        init_db(args.db)   # a bad store path fails now, not after an hour of decoding
    target = load_target()
    outcome = compare(target, prompts, engines, args.draft, args.k, args.max_new_tokens, args.temperature,
                      args.seed, prompt_set_name(args), args.timeout_s)
    if args.db and outcome.rows:
        write_runs_atomic(args.db, outcome.rows)
    if args.json_out:
        write_json(args.json_out, {"engines": outcome.report, "errors": outcome.errors})
    for name, s in outcome.report.items():
        print(f"{name}: {s['tokens_per_s']} tok/s end to end, {s['decode_tokens_per_s']} decode only"
              + (f", tau {s['tau']}" if s.get("tau") else ""), file=sys.stderr)
    for line in outcome.errors:
        print(f"scylla: {line}", file=sys.stderr)
    return 1 if outcome.errors else 0


def cmd_recommend(args) -> int:
    from scylla.sweep import recommend_command

    out = recommend_command(args)
    if args.json_out:
        write_json(args.json_out, out)
    return 0


def write_json(path: str, obj: dict) -> None:
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(obj, indent=2))
    except OSError as exc:
        raise ScyllaError(f"cannot write {path}: {exc.strerror}") from None


COMMANDS = {"generate": cmd_generate, "bench": cmd_bench, "compare-drafts": cmd_compare_drafts, "build-corpus": cmd_build_corpus,
            "train-draft": cmd_train_draft, "export-draft": cmd_export_draft, "fit": cmd_fit, "sweep": cmd_sweep,
            "recommend": cmd_recommend, "peers": cmd_peers}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ScyllaError as exc:
        print(f"scylla: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scylla: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
