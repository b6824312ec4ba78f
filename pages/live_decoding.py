"""Live decoding: plain and speculative decoding side by side, streaming, step by step."""
import streamlit as st

from scylla import ScyllaError, live, plots

st.set_page_config(page_title="Live decoding · Scylla Studio", layout="wide")


@st.cache_resource(show_spinner=False)
def cached_draft(spec: str, target_spec: str, quant: str, _target):
    return live.load_live_draft(spec, _target)


def get_draft(spec: str, target, quant: str):
    # ngram and layer-skip drafts are cheap to build and keep per-call state; trained heads
    # are loaded once per process (they are reset() before every run under the lock).
    if spec == "ngram" or spec.startswith("layerskip"):
        return live.load_live_draft(spec, target)
    return cached_draft(spec, live.target_spec(), quant, target)


st.title("Live decoding")
st.caption("The target decodes the prompt twice: plainly, one token per forward, and "
           "speculatively, where the draft proposes up to k tokens and one target forward "
           "verifies them. Both run on one compute clock, so the race you see is the real speedup. "
           "Speculation wins only when a step makes more tokens (tau) than it costs plain steps: "
           "below the run, the break-even tau, the verdict and the time line say why.")

with st.sidebar:
    st.header("Settings")
    quant = st.selectbox("Target quantization", live.QUANTS, key="quant", help=live.quant_help())
    draft_kind = st.selectbox("Draft", live.LIVE_DRAFTS, index=live.LIVE_DRAFTS.index(live.default_draft(quant)),
                              key="draft_kind",
                              help="scylla / eagle*-style are trained feature heads; ngram copies "
                                   "from the prompt; scylla+ngram copies where the context repeats a "
                                   "run of 4+ tokens, else scylla drafts; layerskip:K runs the "
                                   "target's first K layers.")
    skip_layers = 8
    if draft_kind == "layerskip":
        skip_layers = st.number_input("layerskip: layers K", 1, 29, 8, key="skip_layers")
    temperature = st.slider("Temperature", 0.0, 1.5, 0.0, 0.05, key="temperature")
    top_p = st.slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="top_p")
    shape = st.radio("Draft shape", live.SHAPES, horizontal=True, key="shape",
                     index=live.SHAPES.index(live.default_shape(draft_kind, quant)),
                     help="chain: k tokens in a row; tree: an EAGLE-2 dynamic tree verified in one forward.")
    if shape == "chain":
        auto_k = st.toggle("k chosen per step (auto)", value=live.default_auto_k(quant, draft_kind), key="auto_k",
                           help="The draft length that measured verify cost and acceptance say pays, "
                                "each step (0: plain); on the q4 target verifies cost more with width.")
        k = "auto" if auto_k else st.slider("Chain length k (draft tokens per step)", 1, 12, 6, key="k")
        depth = topk = total = 1
    else:
        tree_depth, tree_topk, tree_total = live.default_tree(temperature)
        depth = st.slider("Tree depth", 1, 8, tree_depth, key="tree_depth")
        topk = st.slider("Top-k expansion", 1, 8, tree_topk, key="tree_topk")
        total = st.slider("Tree nodes verified", 1, 64, tree_total, key="tree_total")
        k = depth
    max_tokens = st.slider("Max new tokens", 8, 256, 64, 8, key="max_tokens")
    seed = st.number_input("Seed (sampling)", 0, 2**31 - 1, 0, key="seed")
    show_rejected = st.toggle("Show rejected drafts inline", value=True, key="show_rejected",
                              help="Off: rejected drafts show on hover over the bonus token.")

examples = live.example_prompts()
ex1, ex2, ex3 = st.columns([1, 3, 1], vertical_alignment="bottom")
category = ex1.selectbox("Example category", list(examples), key="example_category")
example = ex2.selectbox("Example prompt", examples[category], key="example_prompt")
if ex3.button("Use example", key="use_example"):
    st.session_state["prompt"] = example
if "prompt" not in st.session_state:
    st.session_state["prompt"] = examples[category][0]
prompt = st.text_area("Prompt", key="prompt", height=110,
                      max_chars=None, help=f"At most {live.MAX_PROMPT_CHARS} characters.")
go_clicked = st.button("Generate", type="primary", key="generate")

st.markdown(live.legend_html(), unsafe_allow_html=True)
left, right = st.columns(2)
left.subheader("Plain decoding")
right.subheader("Speculative decoding")
slots = {
    "plain": {"metrics": left.empty(), "text": left.empty()},
    "speculative": {"metrics": right.empty(), "text": right.empty()},
}
chart_cols = st.columns(3)
chart_slots = [c.empty() for c in chart_cols]
why_slot = st.empty()
grid_slot = st.empty()
_render_count = [0]
chart_throttle = live.Throttle()
text_throttle = live.Throttle(every_s=0.1)
OUTCOME_BOX = {"wins": st.success, "loses": st.warning, "ties": st.info, "unknown": st.info}


def render(result: dict, final: bool = False) -> None:
    # The browser re-parses a whole transcript on every redraw: a fast engine would outrun
    # it (and several sessions at once would queue seconds behind), so text redraws are
    # throttled too, and always drawn at the end.
    if not final and not text_throttle.due():
        return
    plain, spec = result["plain"], result["speculative"]
    speedup = spec.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s and spec.n_tokens else None
    with slots["plain"]["metrics"].container():
        a, b, c = st.columns(3)
        a.metric("tokens", plain.n_tokens)
        b.metric("tokens/s", f"{plain.tokens_per_s:.1f}")
        c.metric("steps", len(plain.steps))
    slots["plain"]["text"].markdown(plain.html(), unsafe_allow_html=True)
    stats = spec.stats()
    with slots["speculative"]["metrics"].container():
        a, b, c, d = st.columns(4)
        a.metric("tokens", spec.n_tokens)
        b.metric("tokens/s", f"{spec.tokens_per_s:.1f}")
        c.metric("tau", f"{stats['tau']:.2f}")
        d.metric("speedup", f"{speedup:.2f}x" if speedup else "-")
        rate = "-" if stats["accept_rate"] is None else f"{stats['accept_rate']:.2f}"
        st.caption(f"accept_rate {rate} · steps {stats['n_steps']} · "
                   f"draft {result['draft']} · k {result['k']}")
    slots["speculative"]["text"].markdown(spec.html(show_rejected), unsafe_allow_html=True)
    if final or (len(spec.steps) > 1 and chart_throttle.due()):
        _render_count[0] += 1
        n = _render_count[0]
        accepted = spec.accepted_lengths()
        chart_slots[0].plotly_chart(
            plots.step_accept_figure(accepted, result["k"], spec.bonus_counts()),
            width="stretch", key=f"step_chart_{n}")
        chart_slots[1].plotly_chart(plots.accept_hist_figure(accepted, result["k"]),
                                    width="stretch", key=f"hist_chart_{n}")
        chart_slots[2].plotly_chart(plots.confidence_figure(live.confidence_by_position(spec.steps)),
                                    width="stretch", key=f"pos_chart_{n}")
    if final:
        render_why(result, _render_count[0])
        with grid_slot.container():
            st.caption(f"Time to first token: plain {plain.ttft_s or 0:.2f} s, speculative "
                       f"{spec.ttft_s or 0:.2f} s. Engine time: plain {plain.wall_s:.2f} s, "
                       f"speculative {spec.wall_s:.2f} s.")
            with st.expander("Step grid (speculative): drafted, accepted, rejected, bonus"):
                st.markdown(spec.grid_html(), unsafe_allow_html=True)


def render_why(result: dict, n: int) -> None:
    """The verdict, the break-even tau and what it is made of, the compute time line and
    the draft's calibration: all from the run's own Step records."""
    plain, spec = result["plain"], result["speculative"]
    be = live.break_even(plain.steps, spec.steps)
    with why_slot.container():
        st.subheader("Why it wins or loses")
        OUTCOME_BOX[live.outcome(be)](live.verdict(be, result["shape"]))
        if be is not None:
            a, b, c, d = st.columns(4)
            a.metric("tau per step", f"{be.tau:.2f}", help="tokens per speculative step, prefill excluded")
            b.metric("break-even tau", f"{be.break_even_tau:.2f}",
                     help="ms of one speculative step / ms of one plain step, in this run")
            c.metric("speculative step", f"{be.spec_step_ms:.1f} ms",
                     help=f"draft {be.draft_ms:.1f} + verify {be.verify_ms:.1f} + bookkeeping "
                          f"{be.overhead_ms:.1f} ms")
            d.metric("plain step", f"{be.plain_step_ms:.1f} ms", help="one forward, one token")
        st.plotly_chart(plots.timeline_figure(live.timeline(plain.steps, spec.steps)),
                        width="stretch", key=f"timeline_chart_{n}")
        st.caption(live.confidence_note(live.confidence_by_position(spec.steps))
                   + " Break-even tau: the mean ms of a speculative step (draft, verify, "
                     "bookkeeping) over the mean ms of a plain step, both measured in this run "
                     "after the shared prefill.")


if go_clicked:
    st.session_state.pop("live_result", None)
    spec_name = live.draft_spec(draft_kind, skip_layers)
    try:
        with st.spinner(f"Loading the target ({quant}) ..."):
            target = live.live_target(quant)  # loaded once per process (the page prewarms it)
        st.caption(live.kernels_caption(target))
        prompt_ids = live.check_prompt_text(prompt, target, int(max_tokens))
        with st.spinner(f"Loading draft {spec_name} ..."):
            draft = get_draft(spec_name, target, quant)
        if draft is None:
            raise ScyllaError("Choose a draft to compare against plain decoding.")
    except ScyllaError as exc:
        st.error(str(exc))
        st.stop()
    from scylla.decoding import plain_generate, speculative_generate

    result = {"plain": live.Transcript(target.tokenizer, speculative=False),
              "speculative": live.Transcript(target.tokenizer, speculative=True),
              "draft": spec_name, "k": live.chart_k(k), "shape": live.tree_spec(shape, depth, topk, total) or f"chain:{k}"}
    gen_seed = int(seed) if temperature > 0 else None
    try:
        waiting = slots["plain"]["text"]
        with live.generation_slot(on_wait=lambda: waiting.info(
                "The shared model is busy (another session generating); yours starts when it is free.")):
            shared = live.prompt_prefill(target, prompt_ids)  # often done already
            plain_steps = plain_generate(target, prompt_ids, int(max_tokens), temperature, top_p,
                                         seed=gen_seed, shared_prefill=shared)
            spec_steps = speculative_generate(target, draft, prompt_ids, int(max_tokens), k,
                                              temperature, top_p, seed=gen_seed,
                                              tree=live.tree_spec(shape, depth, topk, total),
                                              shared_prefill=shared)
            for side, step, seconds in live.race(plain_steps, spec_steps, shared.verify_ms / 1e3):
                result[side].add(step, seconds)
                render(result)
    except ScyllaError as exc:
        st.error(str(exc))
        st.stop()
    except Exception as exc:  # noqa: BLE001 - shown as a message, never a traceback
        st.error(f"Generation failed: {type(exc).__name__}: {exc}")
        st.stop()
    st.session_state["live_result"] = result

if "live_result" in st.session_state:
    render(st.session_state["live_result"], final=True)
elif not go_clicked:
    slots["plain"]["text"].info("Press Generate to decode the prompt.")
# Last, once the page is on screen: load the target and run the prompt's forward in the
# background, so that Generate starts decoding at once.
live.prewarm_prefill(quant, prompt, int(max_tokens))
