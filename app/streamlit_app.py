"""MatMamba search: query a full-model image index with any nested submodel of the encoder.

Run it with `matsearch app` (or `streamlit run app/streamlit_app.py -- --index DIR`); see app/settings.py for the
options. The model and index are loaded once per server process and shared by every session.
"""
from __future__ import annotations

import gc
import random
import sys
import time
from pathlib import Path

# `streamlit run` puts this file's folder on sys.path, not the repository: make the project's packages importable
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from app import engine  # noqa: E402
from app.settings import Settings, from_argv  # noqa: E402
from vision_model.preprocess import decode_size  # noqa: E402
from vision_model.views import describe  # noqa: E402

UPLOAD_TAB = ":material/upload: Upload images"
GALLERY_TAB = ":material/photo_library: Pick from the database"
GALLERY_SIZE = 16
GALLERY_COLUMNS = 8
RESULT_COLUMNS = 6
MAX_K = 50
STAGES = ("decode", "encode", "search", "rerank")
RERANK_CHOICES = ("all queries", "uncertain queries")
GATE_CHOICES = {"label vote": "vote", "score margin": "margin"}  # the first is the default where labels exist

st.set_page_config(page_title="MatMamba search", page_icon="🔎", layout="wide",
                   initial_sidebar_state="expanded")
st.markdown("""<style>
  .block-container {padding-top: 2.2rem; padding-bottom: 2rem;}
  [data-testid="stImage"] img {image-rendering: pixelated; border-radius: 4px;}
  [data-testid="stMetricValue"] {font-size: 1.35rem;}
  [data-testid="stCaptionContainer"] {line-height: 1.25;}
  div[class*="st-key-hit-"] p, div[class*="st-key-gallery-"] p {margin-bottom: 0.1rem; font-size: 0.85rem;}
  /* the server's transport cap, not the page's limit (stated below the uploader) */
  [data-testid="stFileUploaderDropzoneInstructions"] {display: none;}
</style>""", unsafe_allow_html=True)


# -- settings and shared resources ----------------------------------------------------------------------------------
def current_settings() -> Settings:
    """The script's own arguments under `streamlit run SCRIPT -- ARGS`; elsewhere (e.g. in tests) the environment."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    return from_argv(sys.argv[1:] if script == Path(__file__).resolve() else [])


@st.cache_resource(show_spinner=False)
def get_builder(key: str, _settings: Settings) -> engine.IndexBuilder:
    return engine.IndexBuilder(_settings)


@st.cache_resource(show_spinner="Loading the model and the index …")
def get_searcher(key: str, _settings: Settings):
    searcher = engine.open_searcher(_settings)
    keep_out_of_garbage_collection()
    return searcher


def keep_out_of_garbage_collection() -> None:
    """Streamlit runs a full garbage collection after every script run (`runner.postScriptGC`). It walks every
    object in the process while holding the GIL: with torch, FAISS and the model loaded that is about half a
    million objects, and under load every session's collection queues behind the others'. What is loaded now
    lives as long as the server, so it is moved out of the collector's view (`gc.freeze`); what the sessions
    create afterwards is still collected after each run."""
    gc.collect()
    gc.freeze()


@st.cache_resource(show_spinner=False)
def load_chart_libraries() -> None:
    """pandas and Altair, loaded by the first chart (not before: they cost the server about 90 MB), then kept
    out of the collections like the model."""
    import altair  # noqa: F401
    import pandas  # noqa: F401

    keep_out_of_garbage_collection()


@st.cache_data(max_entries=1024, ttl=3600, show_spinner=False)  # PNG bytes: bounded, shared by the sessions
def item_thumbnail(index_version: str, item_id: int, _store) -> bytes:
    return engine.item_thumbnail_png(_store, item_id)


@st.cache_resource(show_spinner=False, ttl=60)  # a frontier computed while the app runs shows up within a minute
def get_frontier(key: str, _searcher):
    """(frontier or None, a note for the page when there is none)."""
    try:
        frontier = _searcher.frontier()
    except (ValueError, KeyError, OSError) as e:
        return None, f"The budget frontier beside the model cannot be used: {e}"
    if frontier is None or not frontier.points:
        return None, (f"No Mix'n'Match budget frontier for this model (no `pareto.json` in {_searcher.model_dir}). "
                      f"Compute it with `python -m evaluation.frontier --model {_searcher.model_dir}`; until then "
                      "the granularity below is used.")
    return frontier, None


def wait_for_index(settings: Settings, key: str) -> None:
    """The default index is built by the page on first start (once per process, whoever asks first)."""
    st.title("MatMamba search")
    if not settings.is_default_index:
        st.error(f"There is no index in `{settings.index_dir}`. Build one with "
                 f"`matsearch index build SOURCE --out {settings.index_dir}`, or start the app without `--index` "
                 "to use the default Fashion-MNIST index.")
        st.stop()
    builder = get_builder(key, settings)
    if builder.error is None or st.session_state.pop("retry_build", False):
        builder.start()
    size = f"the first {settings.default_limit:,} images" if settings.default_limit else "all 60,000 images"
    st.info(f"Building the default index once: Fashion-MNIST train ({size}) embedded by the full model into "
            f"`{settings.index_dir}`. The page opens when it is ready.")
    bar = st.progress(0.0, text="starting …")
    while builder.running:
        bar.progress(min(builder.fraction, 1.0),
                     text=f"{builder.phase}: {builder.done}/{builder.total or '?'} shards · {builder.elapsed:.0f} s")
        time.sleep(0.3)
    if builder.error is not None:
        st.error(f"Building the index failed: {builder.error}")
        st.button("Try again", on_click=lambda: st.session_state.update(retry_build=True))
        st.stop()
    bar.progress(1.0, text="done")
    st.rerun()


# -- query state ----------------------------------------------------------------------------------------------------
def set_item_query(item_id: int) -> None:
    st.session_state.query = {"kind": "item", "id": int(item_id)}


def only_funnel() -> None:
    if st.session_state.get("funnel"):
        st.session_state.adaptive = False


def only_adaptive() -> None:
    if st.session_state.get("adaptive"):
        st.session_state.funnel = False


def track_uploads(files) -> None:
    """A new set of uploaded files becomes the query; removing them all clears an upload query."""
    signature = tuple((getattr(f, "file_id", None) or f.name, f.size) for f in files or [])
    if signature != st.session_state.get("upload_signature"):
        st.session_state.upload_signature = signature
        if signature:
            st.session_state.query = {"kind": "upload"}
        elif (st.session_state.get("query") or {}).get("kind") == "upload":
            st.session_state.query = None


# -- page parts -----------------------------------------------------------------------------------------------------
def sidebar(searcher):
    """The controls -> (submodel, cascade (funnel, adaptive or None), k, threshold, label ids)."""
    from retrieval.cascade import Cascade
    from retrieval.gate import DEFAULT_VOTE, Gate
    from retrieval.submodel import Submodel

    full = Submodel(level=1)
    levels = searcher.submodels()
    names = [s.name for s in levels]
    with st.sidebar:
        st.header("Query encoder")
        by_budget = st.radio("Choose the submodel by", ["Granularity", "Budget (Mix'n'Match)"], key="encoder_mode",
                             horizontal=True) == "Budget (Mix'n'Match)"
        frontier, note = get_frontier(str(searcher.model_dir), searcher) if by_budget else (None, None)
        granularity = st.radio(
            "Granularity", names, index=0, key="granularity", horizontal=True, disabled=frontier is not None,
            help="The width of every layer: D is the full model, D/8 an eighth of each block's inner width. The "
                 "database was indexed once by D; every granularity queries the same index.")
        st.caption("MFLOPs per query: " + " · ".join(f"{s.name} {searcher.mflops(s):.1f}" for s in levels))
        submodel = Submodel.parse(granularity)
        if by_budget and frontier is None:
            st.info(note)
        elif frontier is not None:
            submodel = budget_controls(frontier)

        st.header("Search")
        funnel_on = st.toggle("Funnel", key="funnel", on_change=only_funnel,
                              help="Shortlist candidates with the chosen submodel, then rerank them by D's query "
                                   "embedding (costs both encodes).")
        shortlist = st.slider("Shortlist size", 10, 1000, 100, step=10, key="shortlist",
                              disabled=not funnel_on)
        rerank_uncertain = st.radio("Rerank", list(RERANK_CHOICES), key="rerank", horizontal=True,
                                    disabled=not funnel_on,
                                    help="Rerank every query, or only the uncertain ones (by the gate below): "
                                         "the others keep the shortlist's order and cost one encode.") \
            == "uncertain queries"
        adaptive_on = st.toggle("Input-adaptive", key="adaptive", on_change=only_adaptive,
                                help="Answer with the chosen submodel; queries the gate below calls uncertain are "
                                     "encoded again by D and searched again.")
        gated = adaptive_on or (funnel_on and rerank_uncertain)
        has_labels = searcher.store.has_labels
        gate_names = list(GATE_CHOICES) if has_labels else ["score margin"]
        if st.session_state.get("gate") not in gate_names:  # default: the vote where there are labels to vote
            st.session_state.gate = gate_names[0]
        gate = GATE_CHOICES[st.radio(
            "Uncertain when", gate_names, key="gate", horizontal=True, disabled=not gated,
            help="label vote: fewer than the threshold's share of the chosen submodel's top 10 results carry its "
                 "top-1 result's label. score margin: the top-1 result beats the top-2 by less than the margin."
                 + ("" if has_labels else " This index has no labels, so only the margin can be used."))]
        vote = st.slider("Vote threshold (share of the top 10)", 0.1, 1.0, DEFAULT_VOTE, step=0.1, format="%.1f",
                         key="vote", disabled=not gated or gate != "vote")
        margin = st.slider("Escalation margin", 0.0, 0.2, 0.02, step=0.005, format="%.3f", key="margin",
                           disabled=not gated or gate != "margin")
        k = st.slider("Results (k)", 1, MAX_K, 12, key="k")
        use_threshold = st.toggle("Score threshold", key="use_threshold",
                                  help="Leave out results whose cosine similarity to the query is lower.")
        threshold = st.slider("Minimum score", -1.0, 1.0, 0.5, step=0.001, format="%.3f", key="threshold",
                              disabled=not use_threshold)
        label_names = searcher.store.label_names
        if label_names:
            chosen = st.multiselect("Only these labels", label_names, key="labels", placeholder="all labels")
            label_ids = [label_names.index(name) for name in chosen]
        else:
            st.caption("This index has no labels to filter by.")
            label_ids = []

    chosen_gate = Gate("vote", round(vote, 3)) if gate == "vote" else Gate("margin", margin)
    if funnel_on:
        cascade = Cascade.funnel(submodel, full, shortlist, chosen_gate if rerank_uncertain else None)
    else:
        cascade = Cascade.adaptive(submodel, full, chosen_gate) if adaptive_on else None
    return submodel, cascade, k, threshold if use_threshold else None, label_ids


def budget_controls(frontier):
    """A budget slider over the Pareto frontier; the most accurate configuration within it."""
    unit = st.radio("Budget in", ["MFLOPs", "ms"], key="budget_unit", horizontal=True)
    values = sorted({float(p.query_mflops if unit == "MFLOPs" else p.latency_ms) for p in frontier.points})
    if len(values) == 1:
        budget = values[0]
        st.caption(f"The frontier has one configuration ({budget:g} {unit}).")
    else:
        budget = st.slider(f"Budget per query ({unit})", float(values[0]), float(values[-1]), float(values[-1]),
                           step=max((values[-1] - values[0]) / 200, 0.001), key=f"budget_{unit}")
    budget = budget * (1 + 1e-6) + 1e-6  # the slider rounds: never lose the point it stands on
    point = frontier.select(budget_mflops=budget if unit == "MFLOPs" else None,
                            budget_ms=budget if unit == "ms" else None)
    st.success(f"**{point.submodel.name}**  \nheld-out top-1 {point.top1:.1%} · {point.query_mflops:.1f} MFLOPs · "
               f"{point.latency_ms:.2f} ms")
    if unit == "ms":
        st.caption(f"Latencies were measured on {frontier.meta.get('machine', 'the machine that built the frontier')}.")
    return point.submodel


def header(searcher, settings: Settings) -> None:
    store = searcher.store
    manifest = store.manifest
    source = manifest.get("build", {}).get("source") or (store.metadata([0])[0] or {}).get("source", "")
    st.title("MatMamba search")
    views = f" (each image {describe(store.views)})" if describe(store.views) else ""
    st.caption(f"{len(store):,} images from `{source}` · index `{settings.index_dir}` "
               f"({manifest.get('index_factory', '?')}, {store.dim}-d) · encoder `{searcher.model_dir.name}` "
               f"({searcher.config.depth} layers, d_model {searcher.config.d_model}; trained on "
               f"{searcher.config.describe_training()} images). The database was embedded "
               f"once by the full model{views}; each query is encoded by the submodel you choose.")


def query_inputs(searcher, settings: Settings) -> None:
    upload_tab, gallery_tab = st.tabs([UPLOAD_TAB, GALLERY_TAB], key="query_tab", on_change="rerun")
    with upload_tab:
        files = st.file_uploader(
            "Drop query images here, or browse", accept_multiple_files=True, key="uploads",
            help="Uploaded files are decoded in memory and never stored.")
        st.caption(f"Up to {settings.max_files} images at once, each at most "
                   f"{settings.max_upload_bytes / 2 ** 20:g} MB and {settings.max_pixels / 1e6:g} megapixels: "
                   "JPEG, PNG, WebP, BMP, GIF, TIFF or PPM.")
        track_uploads(files)
    with gallery_tab:
        if gallery_tab.open:  # only while it is shown: a search from an upload does not redraw its 16 images
            gallery(searcher)


def gallery(searcher) -> None:
    store = searcher.store
    seed = st.session_state.setdefault("gallery_seed", 0)
    ids = sorted(random.Random(seed).sample(range(len(store)), min(GALLERY_SIZE, len(store))))
    rows = store.metadata(ids)
    columns = st.columns(GALLERY_COLUMNS)
    for i, (item_id, row) in enumerate(zip(ids, rows)):
        with columns[i % GALLERY_COLUMNS].container(key=f"gallery-{item_id}"):
            st.image(item_thumbnail(str(store.directory), item_id, store), width="stretch")
            st.caption(row.get("label_name") or row.get("key", ""))
            st.button("Search", key=f"pick-{item_id}", on_click=set_item_query, args=(item_id,), width="stretch")
    st.button("Show other images", icon=":material/shuffle:", key="shuffle",
              on_click=lambda: st.session_state.update(gallery_seed=seed + 1))


def collect_queries(searcher, settings: Settings) -> tuple[list[engine.Query], list[str]]:
    """(the current query images, problems to show): a problem with an upload leaves that file out."""
    query = st.session_state.get("query")
    if query is None:
        return [], []
    if query["kind"] == "item":
        store = searcher.store
        item_id = query["id"]
        start = time.perf_counter()
        try:
            image = store.load_image(item_id, target_size=decode_size(searcher.config))  # as the index decoded it
        except Exception as e:
            return [], [f"Database item #{item_id} cannot be read from its source: {e}"]
        row = store.metadata([item_id])[0]
        name = f"database #{item_id}" + (f" ({row['label_name']})" if row.get("label_name") else "")
        return [engine.Query(name, image, (time.perf_counter() - start) * 1e3, exclude_id=item_id)], []
    files = st.session_state.get("uploads") or []
    problems = []
    if len(files) > settings.max_files:
        problems.append(f"{len(files)} files uploaded: at most {settings.max_files} are searched at once; the "
                        f"first {settings.max_files} are used.")
        files = files[:settings.max_files]
    queries = []
    for f in files:
        try:
            if f.size > settings.max_upload_bytes:  # before reading it
                raise engine.UploadRejected(f"{f.name}: the file is {f.size / 2 ** 20:.1f} MB, over the limit of "
                                            f"{settings.max_upload_bytes / 2 ** 20:g} MB")
            queries.append(engine.decode_upload(f.name, f.getvalue(), settings, decode_size(searcher.config)))
        except engine.UploadRejected as e:
            problems.append(f"Cannot use this upload. {e}")
    return queries, problems


def query_key():
    """What identifies the current query: a database item, or the set of uploaded files."""
    query = st.session_state.get("query")
    if query is None:
        return None
    return ("item", query["id"]) if query["kind"] == "item" else ("upload", st.session_state.get("upload_signature"))


def current_outcomes(searcher, settings: Settings, submodel, cascade, k: int, threshold,
                     label_ids) -> list[engine.Outcome]:
    """The current query's results. A rerun that changes neither the query nor the search's settings (the
    gallery's shuffle, the chart's metric) shows the session's last results again instead of decoding,
    encoding and searching again."""
    key = (query_key(), submodel, cascade, k, threshold, tuple(label_ids))
    last = st.session_state.get("last_search")
    if last is not None and last[0] == key:
        return last[1]
    queries, problems = collect_queries(searcher, settings)
    for problem in problems:
        st.error(problem)
    if not queries:
        return []
    try:
        outcomes = engine.search(searcher, queries, submodel, k, cascade, label_ids, threshold)
    except Exception as e:  # e.g. an image the model cannot preprocess: a message, not a stack trace
        st.error(f"The search failed: {e}")
        return []
    if not problems:  # the messages are shown again by searching again
        st.session_state.last_search = (key, outcomes)
    return outcomes


def show_outcome(index: int, outcome: engine.Outcome, store, k: int) -> None:
    with st.container(border=True, key=f"query-{index}"):
        left, right = st.columns([1, 6], vertical_alignment="center")
        left.image(engine.png_bytes(engine.thumbnail(outcome.image)), width="stretch")
        with right:
            used = " → ".join(outcome.submodels) or "?"
            escalated = f" ({outcome.second_stage})" if outcome.second_stage else ""
            st.markdown(f"**Query:** {outcome.name} &nbsp;·&nbsp; **encoder:** `{used}`{escalated} &nbsp;·&nbsp; "
                        f"**{len(outcome.hits)}** of k={k} results")
            with st.container(key=f"latency-{index}"):
                cells = st.columns(6)
                cells[0].metric("Query MFLOPs", f"{outcome.mflops:.1f}")
                for cell, stage in zip(cells[1:], STAGES):
                    cell.metric(f"{stage.capitalize()} (ms)", f"{outcome.timings[stage]:.1f}")
                cells[5].metric("Total (ms)", f"{outcome.total_ms:.1f}")
        if not outcome.hits:
            st.warning("No results: nothing in the index passes the score threshold and label filter.")
            return
        columns = st.columns(RESULT_COLUMNS)
        for rank, hit in enumerate(outcome.hits, 1):
            with columns[(rank - 1) % RESULT_COLUMNS].container(key=f"hit-{index}-{rank}"):
                st.image(item_thumbnail(str(store.directory), hit.id, store), width="stretch")
                blank = " &nbsp;· *blank: no content*" if hit.blank else ""
                st.markdown(f"**#{rank}** &nbsp;score **{hit.score:.3f}**{blank}  \n{hit.label or hit.key}")
                st.button("More like this", key=f"more-{index}-{rank}-{hit.id}", on_click=set_item_query,
                          args=(hit.id,), width="stretch")


KIND_COLORS = {"level": "#1f77b4", "mix'n'match": "#ff7f0e", "funnel": "#2ca02c", "adaptive": "#9467bd",
               "control": "#7f7f7f"}


def kind_colors(kinds):
    import altair as alt

    domain = list(dict.fromkeys(kinds))
    spare = iter(["#8c564b", "#e377c2", "#17becf", "#bcbd22"] * 4)
    return alt.Scale(domain=domain, range=[KIND_COLORS.get(kind) or next(spare) for kind in domain])


@st.cache_data(max_entries=256, show_spinner=False)  # building an Altair chart validates it: once per setting
def cost_chart_spec(records: list[dict], metric: str, current_name: str, current_mflops: float,
                    title: str) -> tuple[dict, bool]:
    """(the Vega-Lite spec of the accuracy-vs-cost chart, whether the current setting is one of its points)."""
    import altair as alt
    import pandas as pd

    def percent(value) -> float:  # `matsearch eval` writes fractions; accept percentages too
        value = float(value or 0.0)
        return value if value > 1.0 else 100 * value

    frame = pd.DataFrame([{"setting": r["setting"], "kind": r.get("kind", "setting"),
                           "accuracy": percent(r.get(metric, r["top1"])),
                           "MFLOPs": float(r["query_mflops"]),
                           "latency (ms)": float(r.get("latency_ms") or 0.0)} for r in records])
    match = frame[frame.setting == current_name]
    x = alt.X("MFLOPs:Q", title="query encoder MFLOPs per image")
    y = alt.Y("accuracy:Q", title=f"{'top-1' if metric == 'top1' else 'mAP@10'} (%)", scale=alt.Scale(zero=False))
    tooltip = ["setting", "kind", alt.Tooltip("accuracy:Q", format=".2f"), alt.Tooltip("MFLOPs:Q", format=".1f"),
               alt.Tooltip("latency (ms):Q", format=".2f")]
    points = alt.Chart(frame).mark_point(filled=True, size=70, opacity=0.85).encode(
        x=x, y=y, color=alt.Color("kind:N", title=None, scale=kind_colors(frame.kind)),
        shape=alt.Shape("kind:N", title=None), tooltip=tooltip)
    levels = alt.Chart(frame[frame.kind == "level"]).mark_line(opacity=0.35).encode(x=x, y=y)
    now = pd.DataFrame([{"MFLOPs": current_mflops, "label": f"current: {current_name}"}])
    rule = alt.Chart(now).mark_rule(color="#e4572e", strokeDash=[5, 4], size=2).encode(x="MFLOPs:Q")
    right_half = current_mflops > 0.6 * max(frame["MFLOPs"].max(), current_mflops)
    text = alt.Chart(now).mark_text(align="right" if right_half else "left", dx=-6 if right_half else 6,
                                    color="#e4572e", fontWeight="bold").encode(
        x="MFLOPs:Q", y=alt.value(12), text="label:N")
    layers = [levels, points, rule, text]
    if not match.empty:
        layers.append(alt.Chart(match).mark_point(shape="diamond", size=420, filled=False, color="#e4572e",
                                                  strokeWidth=3).encode(x=x, y=y, tooltip=tooltip))
    chart = alt.layer(*layers).properties(height=340, title=alt.TitleParams(title, fontSize=12))
    return chart.to_dict(), not match.empty


@st.cache_data(max_entries=64, show_spinner=False)  # read again only when one of the files changes
def eval_records(paths: tuple[Path, ...], stamps: tuple) -> tuple[list[dict], Path | None, str | None]:
    return engine.load_eval_records(paths)


def file_stamp(path: Path):
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def cost_chart(searcher, settings: Settings, current_name: str, current_mflops: float, measured: bool) -> None:
    candidates = tuple(engine.eval_candidates(settings, searcher.model_dir))
    records, path, problem = eval_records(candidates, tuple(file_stamp(p) for p in candidates))
    scope = engine.EvalScope.of(records)
    on_index = bool(records) and scope.matches(searcher.store)
    elsewhere = f" (measured on {engine.source_name(scope.database_source)}, not on this index)"
    st.subheader("Accuracy vs cost" + ("" if on_index or not records else elsewhere))
    if problem:
        st.warning(problem)
    if records and not on_index:  # the numbers describe the model on its evaluation set, not searches here
        sources = ", ".join(engine.source_name(s) for s in searcher.store.manifest.get("sources", [])) or "?"
        st.info(f"Measured on {scope.describe()}, not on this index ({sources}): the chart compares the "
                "settings on that data; it does not say how accurately they search these images.")
    if not records:
        looked = ", ".join(f"`{p}`" for p in engine.eval_candidates(settings, searcher.model_dir))
        st.info(f"No evaluation results to chart (looked for {looked}). Make them with "
                f"`matsearch eval --json {engine.eval_candidates(settings, searcher.model_dir)[0]}`, or start the "
                "app with `--eval-json FILE`.")
        return
    metric = st.radio("Accuracy", ["top1", "map@10"], key="chart_metric", horizontal=True,
                      format_func={"top1": "top-1", "map@10": "mAP@10"}.get)
    title = f"measured on {scope.describe()}" + ("" if on_index else " (not this index)")
    load_chart_libraries()
    spec, ringed = cost_chart_spec(records, metric, current_name, current_mflops, title)
    st.vega_lite_chart(spec=spec, width="stretch")
    how = "measured on the last query" if measured else "from the cost model"
    found = (f"the current setting **{current_name}** is the ringed point" if ringed
             else f"the current setting **{current_name}** was not evaluated; the dashed line marks its cost")
    where = "on this index" if on_index else "not on this index"
    st.caption(f"From `{path}` ({len(records)} settings, {where}); {found} ({current_mflops:.1f} MFLOPs, {how}).")


# -- the page -------------------------------------------------------------------------------------------------------
def main() -> None:
    try:
        settings = current_settings()
    except ValueError as e:
        st.error(f"Bad app setting: {e}")
        st.stop()
    key = f"{settings!r} in {Path.cwd()}"  # relative paths name other folders from another working directory
    if not engine.index_exists(settings.index_dir):
        wait_for_index(settings, key)
    try:
        searcher = get_searcher(key, settings)
    except ImportError as e:
        st.error(f"The retrieval package cannot be imported: {e}")
        st.stop()
    except Exception as e:  # missing or damaged index, missing or mismatched model: say so, no traceback
        st.title("MatMamba search")
        st.error(f"Cannot open the index `{settings.index_dir}`: {e}")
        st.stop()

    submodel, cascade, k, threshold, label_ids = sidebar(searcher)
    header(searcher, settings)
    st.session_state.setdefault("query", None)
    search_area(searcher, settings, submodel, cascade, k, threshold, label_ids)


@st.fragment
def search_area(searcher, settings: Settings, submodel, cascade, k: int, threshold, label_ids) -> None:
    """The query inputs, the results and the chart. An upload, a pick from the database, "More like this" or the
    chart's metric rerun only this part of the page (the sidebar and header stay as they are, in the server and
    in the browser); the sidebar's controls rerun the whole page, which passes their new values here."""
    query_inputs(searcher, settings)
    outcomes = []
    if st.session_state.query is None:
        st.info("Upload an image, or pick one from the database, to search.")
    else:
        outcomes = current_outcomes(searcher, settings, submodel, cascade, k, threshold, label_ids)
    for i, outcome in enumerate(outcomes):
        show_outcome(i, outcome, searcher.store, k)

    canonical = submodel.canonical(searcher.config)
    name = engine.setting_name(canonical.name, cascade)
    funnel = cascade is not None and cascade.kind == "funnel"  # before any query: a funnel's both encodes
    mflops = (sum(o.mflops for o in outcomes) / len(outcomes)) if outcomes else (
        cascade.mflops(searcher.config) if funnel else searcher.mflops(canonical))
    cost_chart(searcher, settings, name, mflops, bool(outcomes))


main()
