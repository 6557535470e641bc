"""Advisor: will this fine-tune fit this machine (or a saved one), and how fast will it step? What-if controls
over lowres.advisor's estimate; charts of the memory breakdown with the machine's limit marked."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

import queries
import queries_advisor
from lowres.cli.advise import TERM_LABELS

GIB = 1024**3
THIS_MACHINE = "this machine (detected)"

st.title("Advisor")
opts = queries_advisor.choices()

head = st.container()  # filled once the controls below have been read
left, right = st.columns([1, 2])
with left:
    hw_name = st.selectbox("Hardware", [THIS_MACHINE, *opts["hardware"]], key="adv_hw")
    models = opts["models"]
    model = st.selectbox("Model preset", models, index=models.index("SmolLM2-135M") if "SmolLM2-135M" in models
                         else 0, key="adv_model")
    own = st.text_input("…or your own model: a folder with config.json, or a hub id", key="adv_own_model",
                        help="Any decoder-only causal LM transformers can build; shapes come from its config.json")
    model = own.strip() or model
    compute = st.selectbox("Precision", ["auto", "fp32", "bf16", "fp16"], key="adv_compute")
    quant = st.selectbox("Quantization", ["none", "int8", "nf4", "fp4"], key="adv_quant")
    rank = st.select_slider("LoRA rank", [1, 2, 4, 8, 16, 32, 64, 128, 256], value=8, key="adv_rank")
    targets = st.selectbox("LoRA targets", ["attention_mlp", "attention", "all_linear"], key="adv_targets")
    batch = st.number_input("Batch size", min_value=1, max_value=4096, value=4, key="adv_batch")
    seq_len = st.number_input("Sequence length", min_value=8, max_value=131072, value=256, step=64,
                              key="adv_seq")
    ckpt = st.checkbox("Gradient checkpointing", key="adv_ckpt")
    headroom = st.slider("Headroom kept free", 0.0, 0.5, 0.10, 0.05, key="adv_headroom")

hw = queries_advisor.hardware(None if hw_name == THIS_MACHINE else hw_name)
candidate = {"compute": compute, "quant": quant, "double_quant": True, "lora_rank": int(rank),
             "lora_targets": targets, "batch_size": int(batch), "seq_len": int(seq_len),
             "gradient_checkpointing": bool(ckpt), "loss_chunk_tokens": 1024, "optimizer": "adamw"}
adv = queries_advisor.advice(model, hw, candidate, headroom)
est = adv["estimate"]
budget, peak = est["budget_bytes"], est["peak_bytes"]

with head:
    where = "estimate only: a saved profile, not this machine" if hw["is_estimate_only"] else "this machine"
    st.caption(f"**{hw['tier']}** · fingerprint `{hw['fingerprint']}` · {where} · {adv['model']} "
               f"({adv['parameters'] / 1e6:.0f}M parameters) · device {est['device']}, "
               f"compute {est['candidate']['compute']}")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Predicted peak", f"{peak / GIB:.2f} GiB")
    c2.metric("Usable memory", "unknown" if budget is None else f"{budget / GIB:.2f} GiB")
    c3.metric("Step time", "unknown" if est["step_time_s"] is None else f"{est['step_time_s']:.3f} s")
    c4.metric("Largest batch that fits", adv["largest_batch"])

with right:
    if est["fits"] is None:
        st.info("Usable memory unknown: no verdict.")
    elif est["fits"]:
        st.success(f"Fits with {headroom:.0%} headroom. Recommendation: batch {adv['largest_batch']} is the "
                   f"largest that fits these settings; throughput grows with the batch until the device is busy.")
    else:
        st.error(f"Does not fit: {peak / GIB:.2f} GiB predicted, {budget * (1 - headroom) / GIB:.2f} GiB allowed. "
                 + ("No batch fits: try quantization, a shorter length or checkpointing." if not adv["largest_batch"]
                    else f"Batch {adv['largest_batch']} fits."))
    for w in est["warnings"]:
        st.warning(w)

    terms = pd.DataFrame([{"term": TERM_LABELS.get(k, k), "GiB": v / GIB}
                          for k, v in est["memory_bytes"].items() if v])
    limits = pd.DataFrame([{"limit": "usable memory", "GiB": budget / GIB},
                           {"limit": f"with {headroom:.0%} headroom", "GiB": budget * (1 - headroom) / GIB}]
                          ) if budget else pd.DataFrame(columns=["limit", "GiB"])
    bar = alt.Chart(terms).mark_bar().encode(
        x=alt.X("sum(GiB):Q", title="GiB"), color=alt.Color("term:N", title=None), tooltip=["term", "GiB"])
    rules = alt.Chart(limits).mark_rule(color="red", strokeWidth=2).encode(
        x="GiB:Q", strokeDash=alt.StrokeDash("limit:N", title="machine limit"), tooltip=["limit", "GiB"])
    st.subheader("Predicted peak memory, term by term")
    st.altair_chart(alt.layer(bar, rules).properties(height=220), width="stretch")

    sweep = pd.DataFrame([{"batch": s["candidate"]["batch_size"], "term": TERM_LABELS.get(k, k), "GiB": v / GIB}
                          for s in adv["sweep"] for k, v in s["memory_bytes"].items() if v])
    area = alt.Chart(sweep).mark_area().encode(
        x=alt.X("batch:Q", scale=alt.Scale(type="log", base=2), title="batch size"),
        y=alt.Y("sum(GiB):Q", title="GiB"), color=alt.Color("term:N", title=None))
    hrules = alt.Chart(limits).mark_rule(color="red", strokeWidth=2).encode(
        y="GiB:Q", strokeDash=alt.StrokeDash("limit:N", title="machine limit"))
    st.subheader("Memory against batch size")
    st.altair_chart(alt.layer(area, hrules), width="stretch")

    times = pd.DataFrame([{"batch": s["candidate"]["batch_size"], "step time (s)": s["step_time_s"],
                           "tokens/s": s["tokens_per_s"], "fits": s["fits"]} for s in adv["sweep"]])
    st.subheader("Step time against batch size")
    if times["step time (s)"].notna().any():
        st.altair_chart(alt.Chart(times).mark_line(point=True).encode(
            x=alt.X("batch:Q", scale=alt.Scale(type="log", base=2), title="batch size"),
            y="step time (s):Q", color=alt.Color("fits:N"), tooltip=list(times.columns)),
            width="stretch")
    else:
        st.info("Step time unknown: this profile lists no roofline (peak FLOP/s) for this precision.")

st.subheader("Candidates (precision × quantization × rank)")
st.dataframe(pd.DataFrame(adv["grid"]), hide_index=True)

st.subheader("Write this RunConfig")
slug = f"{model}-{est['candidate']['compute']}-{quant}-r{rank}-b{batch}".lower()
yaml_text = queries_advisor.run_config_yaml(model, candidate, output_dir=f"runs/{slug}")
path = st.text_input(f"File (inside the runs folder {queries.runs_dir()})", value=f"advisor-{slug}.yaml",
                     key="adv_path")
cols = st.columns([1, 1, 4])
if cols[0].button("Write RunConfig", key="adv_write"):
    try:
        written = queries_advisor.write_run_config(path, yaml_text, queries.runs_dir())
        st.success(f"wrote {written} — run it with `lowres train {written}`")
    except ValueError as exc:
        st.error(str(exc))
cols[1].download_button("Download", yaml_text, file_name=f"advisor-{slug}.yaml", mime="text/yaml")
with st.expander("RunConfig YAML"):
    st.code(yaml_text, language="yaml")
