"""`matsearch bench` on CPU: outputs, FLOP formulas against torch's FlopCounterMode, out-of-memory handling."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import benchmarks.resolution as bench
from benchmarks import report
from benchmarks.measure import Timing, interleaved_best, is_out_of_memory, run_unless_oom
from benchmarks.models import (MNM_PRESETS, ModelSpec, Setting, build_model, flops_per_image, parse_model_spec,
                               FULL, settings_for, vit_flops)
from app.cli import main as matsearch
from vision_model import create_model, submodel_cost
from vision_model.block import IN_PROJ_ROW_MULTIPLE
from vision_model.cost import ssd_flops
from vision_model.datasets import fashion_mnist_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
META_KEYS = {"device", "date", "torch", "triton", "timm", "mamba_ssm"}


def _addmm_inplace_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counted_flops(fn, *args) -> int:
    """All FLOPs FlopCounterMode counts in fn(*args) (matrix products and convolutions), with a formula for the
    in-place `Tensor.addmm_` the encoder's residual add runs in (FlopCounterMode has none for in-place ops)."""
    custom = {torch.ops.aten.addmm_: _addmm_inplace_flops}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter, torch.inference_mode():
        fn(*args)
    return counter.get_total_flops()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the quick run, end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    eval_json = out / "eval.json"  # the shape of a retrieval eval: setting, top1, query_mflops
    eval_json.write_text(json.dumps({"records": [
        {"setting": "D", "top1": 0.91, "query_mflops": 120.0},
        {"setting": "D/8", "top1": 0.85, "query_mflops": 20.0},
        {"setting": "mnm:512,256", "top1": 0.89, "query_mflops": 90.0},  # how the eval names mnm-half here
        {"setting": "funnel", "top1": 0.90, "query_mflops": 40.0}]}))
    rc = matsearch(["bench", "--quick", "--device", "cpu", "--repeats", "1", "--out", str(out),
                    "--eval-json", str(eval_json)])
    assert rc == 0
    return out


def test_quick_run_writes_json_with_required_keys(quick_run):
    data = json.loads((quick_run / "bench.json").read_text())
    assert META_KEYS <= set(data["meta"])
    rows = data["rows"]
    # 2 resolutions x (3 MatMamba settings + 1 ViT) x (throughput + latency)
    assert len(rows) == 2 * 4 * 2
    for row in rows:
        assert set(report.ROW_KEYS) <= set(row)
        assert row["status"] == "ok", row
        assert row["images_per_s"] > 0 and row["latency_ms"] > 0 and row["gflops_per_image"] > 0
        assert row["achieved_tflops"] == pytest.approx(row["gflops_per_image"] * row["images_per_s"] / 1e3)
        assert row["peak_mem_gib"] is None  # CPU: not tracked
    assert {r["batch"] for r in rows if r["mode"] == "latency"} == {1}
    assert {r["batch"] for r in rows if r["mode"] == "throughput"} == {2}  # the --quick batch cap
    mnm = next(r for r in rows if r["setting"] == "mnm-half")
    assert mnm["widths"] == [512, 256] and mnm["level"] is None


def test_quick_run_flops_come_from_the_cost_model(quick_run):
    rows = json.loads((quick_run / "bench.json").read_text())["rows"]
    cfg = create_model("matmamba_vision_35m", depth=2).config
    d8 = next(r for r in rows if r["setting"] == "D/8" and r["resolution"] == 64)
    expected = submodel_cost(cfg, level=8, img_size=64, include_head=False).flops / 1e9
    assert d8["gflops_per_image"] == pytest.approx(expected)


def test_quick_run_writes_markdown_and_plots(quick_run):
    md = (quick_run / "bench.md").read_text()
    assert "| model | setting | res | batch | mode | images/s |" in md
    assert "## Throughput (images/s)" in md and "vit_small_patch16_224:depth=2" in md
    for name in ("throughput_vs_resolution.png", "throughput_vs_level.png", "accuracy_vs_cost.png"):
        assert (quick_run / name).read_bytes()[:8] == PNG_MAGIC, name
    assert not (quick_run / "memory_vs_resolution.png").exists()  # no memory numbers on CPU: no empty plot


def test_accuracy_plot_pairs_eval_settings_with_measured_throughput(quick_run):
    _, rows = report.read_json(quick_run / "bench.json")
    speed = report.throughput_by_setting(rows, model=None, resolution=None)
    assert {"D", "D/8", "mnm-half", "mnm:512,256"} <= set(speed)  # first MatMamba model, smallest resolution
    assert speed["mnm:512,256"] == speed["mnm-half"] and "32 px" in speed["D"][1]
    records = report.load_eval_records(quick_run / "eval.json")
    assert [r["setting"] for r in records] == ["D", "D/8", "mnm:512,256", "funnel"]


def test_missing_eval_json_is_skipped(tmp_path, capsys):
    rc = matsearch(["bench", "--quick", "--device", "cpu", "--repeats", "1", "--resolutions", "32", "--levels", "8",
                    "--models", "matmamba_vision_35m:depth=1", "--out", str(tmp_path), "--eval-json",
                    str(tmp_path / "absent.json")])
    assert rc == 0
    assert "does not exist" in capsys.readouterr().out
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "accuracy_vs_cost.png").exists()


def test_reports_from_rows_with_memory_and_merge(tmp_path):
    """GPU-shaped rows (with memory) through every plot, and --merge of two run directories."""
    def row(model, setting, res, mode, ips, mem):
        point = bench.Point(ModelSpec(model), Setting(setting, level=1 if setting == "D" else None), res, 18.0)
        batch = 8 if mode == "throughput" else 1
        return point.row(mode, batch, Timing([batch / ips], int(mem * 2 ** 30)))
    for i, res in enumerate((224, 512)):
        rows = [row("matmamba_vision_35m", "D", res, "throughput", 4000 / (i + 1), 2.0),
                row("matmamba_vision_35m", "D", res, "latency", 300, 0.2 * (i + 1)),
                row("vit_small_patch16_224", "full", res, "throughput", 5000 / (i + 3), 1.0),
                row("vit_small_patch16_224", "full", res, "latency", 400, 0.1 * (i + 1))]
        report.write_reports(tmp_path / f"run{i}", {"device": "test"}, rows)
    assert matsearch(["bench", "--merge", str(tmp_path / "run0"), str(tmp_path / "run1"),
                      "--out", str(tmp_path / "all")]) == 0
    meta, rows = report.read_json(tmp_path / "all" / "bench.json")
    assert len(rows) == 8 and len(meta["merged_from"]) == 2
    assert (tmp_path / "all" / "memory_vs_resolution.png").read_bytes()[:8] == PNG_MAGIC
    assert "| vit_small_patch16_224 | 1667 | 1250 |" in (tmp_path / "all" / "bench.md").read_text()


def test_spent_time_budget_skips_points_but_still_reports(tmp_path):
    assert matsearch(["bench", "--quick", "--device", "cpu", "--time-budget", "0", "--out", str(tmp_path)]) == 0
    _, rows = report.read_json(tmp_path / "bench.json")
    assert rows and {r["status"] for r in rows} == {"skipped"}
    assert {r["note"] for r in rows} == {"time budget spent"}
    assert (tmp_path / "bench.md").exists()


def test_dry_run_prints_batch_caps(capsys):
    assert matsearch(["bench", "--device", "cpu", "--dry-run", "--models", "matmamba_vision_35m:depth=2",
                      "--resolutions", "224", "2048", "--max-batch", "256"]) == 0
    out = capsys.readouterr().out
    assert " 224       256 " in out and " 2048         4 " in out
    assert bench.main(["--device", "cpu", "--dry-run", "--models", "vit_small_patch16_224:depth=1",
                       "--resolutions", "384"]) == 0  # python -m benchmarks.resolution: the same command
    assert "vit_small_patch16_224:depth=1" in capsys.readouterr().out


# -- FLOPs --------------------------------------------------------------------------------------------------------

@pytest.fixture
def unfused_timm_attention():
    """timm's attention written out as matmuls, so the counter sees Q K^T and softmax(.) V as matrix products
    whichever fused attention kernel this torch would dispatch (FlopCounterMode has formulas for matrix products,
    not necessarily for every fused attention op)."""
    from timm.layers import set_fused_attn, use_fused_attn
    before = (use_fused_attn(), use_fused_attn(experimental=True))
    set_fused_attn(False)
    yield
    set_fused_attn(before[0] or before[1], experimental=before[1])


def test_vit_formula_matches_flop_counter_on_a_small_vit(unfused_timm_attention):
    torch.manual_seed(0)
    vit = build_model(parse_model_spec("vit_small_patch16_224:depth=2:embed_dim=64:num_heads=2"),
                      torch.device("cpu"), torch.float32)
    batch, res = 2, 96  # 36 patches + CLS
    assert flops_per_image(vit, Setting("full"), res) * batch == counted_flops(vit, torch.randn(batch, 3, res, res))


def test_vit_formula_hand_count_for_vit_s16_at_224():
    # ViT-S/16: 196 patches + CLS, d 384, 12 blocks, MLP 1536; timm lists it at 4.6 GMACs
    flops = vit_flops(num_patches=196, num_prefix_tokens=1, embed_dim=384, depth=12, mlp_hidden=1536,
                      in_chans=3, patch_size=16)
    patch_embed = 2 * 196 * 768 * 384
    block = 2 * 197 * 384 * (3 * 384 + 384 + 2 * 1536) + 4 * 197 ** 2 * 384
    assert flops == patch_embed + 12 * block
    assert 4.55e9 < flops / 2 < 4.65e9


# A config with the 35M model's structure (one B/C group, several heads per level) at a test size, with a sequence
# that spans several SSD chunks (65 tokens, chunk 16) so every part of the chunked scan runs.
SMALL = dict(d_model=64, depth=2, d_state=16, headdim=8, chunk_size=16, patch_size=8)


def cost_model_parts(cfg, widths, seqlen) -> dict[str, int]:
    """The cost model's FLOPs by part: the projections (in_proj, out_proj), the depthwise convs, the chunked SSD."""
    d, N, K = cfg.d_model, cfg.d_state, cfg.d_conv
    parts = {"proj": 0, "conv": 0, "ssd": 0}
    for inner in (cfg.inner_of(w) for w in widths):
        h = inner // cfg.headdim
        parts["proj"] += 2 * seqlen * d * (2 * inner + 2 * N + h) + 2 * seqlen * inner * d
        parts["conv"] += 2 * seqlen * (inner + 2 * N) * K
        parts["ssd"] += ssd_flops(seqlen, inner, N, cfg.chunk_size)
    return parts


def torch_ssd_extra(cfg, widths, seqlen) -> int:
    """What the PyTorch chunked SSD computes beyond the cost model (which counts the Triton kernels' algorithm):
    it passes states between c chunks with one dense (c+1) x (c+1) einsum, 2 N inner (c+1)^2 FLOPs, where the
    kernels run a linear recurrence, 2 N inner c; with a single chunk it skips the chunk states altogether."""
    T = min(cfg.chunk_size, seqlen)
    c = -(-seqlen // T)
    extra = 0
    for inner in (cfg.inner_of(w) for w in widths):
        N = cfg.d_state
        if c > 1:
            extra += 2 * N * inner * ((c + 1) ** 2 - c)
        else:
            extra -= 4 * T * N * inner + 2 * N * inner
    return extra


@pytest.mark.parametrize("chunk_size", [16, 256])  # several chunks; one chunk
@pytest.mark.parametrize("widths", [(64, 64), (64, 16)])  # D; Mix'n'Match
def test_matmamba_cost_model_matches_flop_counter(chunk_size, widths):
    """The PyTorch backend's counted FLOPs are the cost model's plus exactly the work it is known to do beyond
    it, part by part; no assumption about which aten ops torch dispatches for them."""
    torch.manual_seed(0)
    model = create_model("matmamba_vision_35m", **{**SMALL, "chunk_size": chunk_size}).eval()
    cfg, res = model.config, 64
    patches = (res // cfg.patch_size) ** 2
    seqlen = patches + 1  # CLS suffix
    counted = counted_flops(lambda x: model.embed(x, widths=list(widths), backend="torch"), torch.randn(1, 3, res, res))
    parts = cost_model_parts(cfg, widths, seqlen)
    patch_embed = 2 * patches * cfg.in_chans * cfg.patch_size ** 2 * cfg.d_model
    model_total = submodel_cost(cfg, widths=widths, img_size=res, include_head=False).flops
    assert patch_embed + sum(parts.values()) == model_total  # the split above is the cost model, term by term

    # beyond the cost model, torch computes:
    # - the zero rows inference pads in_proj with (to a multiple of 64 outputs, for the GPU's GEMM kernels and
    #   aligned rows), and the CLS token's zero patch row (the patch GEMM writes the CLS row too, so no
    #   concatenation is needed)
    in_rows = [2 * cfg.inner_of(w) + 2 * cfg.d_state + cfg.inner_of(w) // cfg.headdim for w in widths]
    padding = sum(-rows % IN_PROJ_ROW_MULTIPLE for rows in in_rows) * 2 * seqlen * cfg.d_model
    cls_row = 2 * cfg.in_chans * cfg.patch_size ** 2 * cfg.d_model
    # - the causal depthwise conv's padded tail: it pads K-1 on both sides and drops the tail, so (L + K - 1)
    #   outputs per channel where L are used (within 5% here, 65 tokens; ~1.5% at 224 px)
    K = cfg.d_conv
    conv_tail = parts["conv"] * (K - 1) // seqlen
    assert conv_tail <= 0.05 * parts["conv"]
    # - the dense state passing of the PyTorch SSD (torch_ssd_extra)
    expected = model_total + padding + cls_row + conv_tail + torch_ssd_extra(cfg, widths, seqlen)
    assert counted == expected
    # all together: within 10% of the cost model at this size
    assert counted == pytest.approx(model_total, rel=0.10)


# -- out of memory ------------------------------------------------------------------------------------------------

def fake_oom(what: str = "") -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB {what}")


def test_oom_is_recognised_and_other_errors_propagate():
    assert is_out_of_memory(fake_oom())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not is_out_of_memory(ValueError("out of memory"))

    def boom():
        raise fake_oom()
    assert run_unless_oom(boom)[0] is None and "out of memory" in run_unless_oom(boom)[1]
    with pytest.raises(ValueError):
        run_unless_oom(lambda: (_ for _ in ()).throw(ValueError("bad shape")))


def test_largest_batch_halves_until_it_fits():
    def run_batch(batch):
        if batch > 2:
            raise fake_oom()
        return Timing([0.01], None)
    batch, timing, ooms = bench.largest_batch_timing(run_batch, 8)
    assert batch == 2 and timing.seconds == [0.01] and [b for b, _ in ooms] == [8, 4]
    assert bench.largest_batch_timing(lambda b: (_ for _ in ()).throw(fake_oom()), 4)[0] is None


def test_oom_rows_are_recorded_and_the_run_continues(tmp_path, monkeypatch):
    """D runs out of memory above batch 1 at 32 px and at batch 1 from 64 px; D/8 and the ViT always fit."""
    real_encoder_call = bench.encoder_call
    freed = []

    def encoder_call(model, setting):
        encode = real_encoder_call(model, setting)
        if setting.label != "D":
            return encode

        def encode_or_oom(x):  # fails inside the forward, as a real OOM would (here during warm-up)
            if x.shape[0] > 1 or x.shape[-1] >= 64:
                raise fake_oom(f"at {x.shape[-1]} px, batch {x.shape[0]}")
            return encode(x)
        return encode_or_oom

    monkeypatch.setattr(bench, "encoder_call", encoder_call)
    monkeypatch.setattr("benchmarks.measure.free_memory", lambda: freed.append(1))
    rc = matsearch(["bench", "--quick", "--device", "cpu", "--repeats", "1", "--levels", "1", "8",
                    "--models", "matmamba_vision_35m:depth=1", "vit_small_patch16_224:depth=1",
                    "--resolutions", "32", "64", "96", "--out", str(tmp_path)])
    assert rc == 0
    rows = {(r["model"].split(":")[0], r["setting"], r["resolution"], r["mode"]): r
            for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    mm = "matmamba_vision_35m"
    fit_at_1 = rows[(mm, "D", 32, "throughput")]
    assert fit_at_1["status"] == "ok" and fit_at_1["batch"] == 1 and "out of memory at batch 2" in fit_at_1["note"]
    assert rows[(mm, "D/8", 32, "throughput")]["batch"] == 1  # narrower settings start from the batch that fitted
    assert rows[(mm, "D", 64, "throughput")]["status"] == "oom"
    assert rows[(mm, "D", 64, "latency")]["status"] == "oom"
    assert rows[(mm, "D", 96, "throughput")]["status"] == "skipped"  # cannot fit where a smaller size did not
    assert rows[(mm, "D/8", 96, "throughput")]["status"] == "ok"
    assert all(rows[("vit_small_patch16_224", "full", res, "throughput")]["status"] == "ok" for res in (32, 64, 96))
    assert freed  # memory was released after each out-of-memory error
    assert "oom" in (tmp_path / "bench.md").read_text()


# -- small pieces -------------------------------------------------------------------------------------------------

def test_cuda_graph_capture_failure_falls_back_to_eager(monkeypatch):
    def refuse(fn, x):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(bench, "capture_cuda_graph", refuse)
    plan = bench.Plan(torch.device("cpu"), torch.float32, [], [], [], repeats=2, warmup=1, max_batch=1,
                      max_tokens=1, seconds_per_point=None, cuda_graphs=True, compile=False, ssd_backend="torch",
                      deadline=None)
    model = _PatchModel()
    timing, note = bench.time_batch_graphed(model, model, 32, 2, plan)
    assert len(timing.seconds) == 2 and "capture failed" in note and "eager" in note
    # rows say so: neither the throughput nor the latency row claims a graph
    point = bench.Point(parse_model_spec("vit_tiny"), FULL, 32, None)
    for row in (bench.throughput_row(point, model, model, 2, plan), bench.latency_row(point, model, model, plan)):
        assert row["status"] == "ok" and row["cuda_graph"] is False and "capture failed" in row["note"]


def test_out_of_memory_during_capture_halves_the_batch(monkeypatch):
    def oom_above_one(fn, x):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return lambda: fn(x)
    monkeypatch.setattr(bench, "capture_cuda_graph", oom_above_one)
    plan = bench.Plan(torch.device("cpu"), torch.float32, [], [], [], repeats=2, warmup=1, max_batch=4,
                      max_tokens=1, seconds_per_point=None, cuda_graphs=True, compile=False, ssd_backend="torch",
                      deadline=None)
    model = _PatchModel()
    row = bench.throughput_row(bench.Point(parse_model_spec("vit_tiny"), FULL, 32, None), model, model, 4, plan)
    assert row["batch"] == 1 and row["cuda_graph"] is True and "out of memory at batch 4, 2" in row["note"]


class _PatchModel(torch.nn.Module):
    """The least a timm-like model needs for the benchmark's input helpers."""

    def __init__(self):
        super().__init__()
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, 4, 16, stride=16)

    def forward(self, x):
        return self.patch_embed.proj(x)


def test_model_specs_settings_and_batch_caps():
    spec = parse_model_spec("matmamba_vision_35m:depth=4:drop_path_rate=0.0")
    assert spec.overrides == (("depth", 4), ("drop_path_rate", 0.0))
    assert spec.label == "matmamba_vision_35m:depth=4:drop_path_rate=0.0"
    with pytest.raises(ValueError):
        parse_model_spec("matmamba_vision_35m:depth")
    model = create_model("matmamba_vision_35m", depth=4)
    settings = settings_for(model, [1, 8, *MNM_PRESETS])
    assert [s.label for s in settings] == ["D", "D/8", "mnm-half", "mnm-taper"]
    assert settings[3].widths == (512, 256, 128, 64)
    for s in settings:  # every preset is a valid Mix'n'Match config
        model.config.resolve_widths(s.level, s.widths)
    assert settings_for(timm.create_model("vit_small_patch16_224", depth=1), [1, 8]) == [Setting("full")]
    plan = bench.Plan(torch.device("cpu"), torch.float32, [], [], [], 1, 1, max_batch=256, max_tokens=65536,
                      seconds_per_point=None, cuda_graphs=False, compile=False, ssd_backend="torch", deadline=None)
    assert [bench.batch_cap(plan, (r // 16) ** 2) for r in (224, 384, 512, 768, 1024, 1536, 2048)] == \
        [256, 64, 64, 16, 16, 4, 4]


def test_interleaved_best_times_each_call_inside_its_context_every_round():
    """The GPU diagnostics' A/B timing: every call runs inside its own context in every round (rounds interleave the
    variants), and the best round is kept."""
    import contextlib
    import time
    entered = []

    def context(name):
        @contextlib.contextmanager
        def enter():
            entered.append(name)
            yield
        return enter
    calls = [(context("fast"), lambda: None), (context("slow"), lambda: time.sleep(0.01))]
    best = interleaved_best(calls, torch.device("cpu"), rounds=3, repeats=2)
    assert entered == ["fast", "slow"] * 3
    assert best[0] < 0.005 and 0.01 <= best[1] < 0.1


@pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
def test_knn_gap_finds_planted_mislabelled_database_images(monkeypatch, tmp_path):
    """Relabel a tenth of the database images: the shipped classifier disputes them, and they become the
    neighbours that cost 1-NN queries the classifier gets right."""
    from evaluation import datasets, knn_gap
    read = datasets.fashion_mnist
    images, labels = read("train")
    planted = labels.copy()
    planted[:400:10] = (planted[:400:10] + 1) % 10
    monkeypatch.setattr(datasets, "fashion_mnist", lambda split: (images, planted) if split == "train" else read(split))
    assert knn_gap.main(["--limit-db", "400", "--limit-queries", "150", "--json", str(tmp_path / "gap.json")]) == 0
    r = json.loads((tmp_path / "gap.json").read_text())
    assert r["database"] == 400 and r["queries"] == 150
    assert 10 <= r["disputed_database_images"] <= 14  # the 10% planted, plus the few the model misreads
    assert r["disputed_among_misleading_neighbours"] >= 60
    assert r["nn1_top1_without_disputed_neighbours"] > r["nn1_top1"]
    assert r["nn1_top1"] == pytest.approx(
        r["classifier_top1"] - r["classifier_right_nn1_wrong"] + r["classifier_wrong_nn1_right"], abs=0.02)


@pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
def test_view_averaging_single_view_matches_plain_retrieval(tmp_path):
    """One view is plain retrieval (the same numbers as the accuracy-vs-resolution study at 28 px); more query views
    cost that many times the level's MFLOPs."""
    from benchmarks import accuracy_resolution, view_averaging
    limits = dict(limit_db=300, limit_queries=60)
    records = view_averaging.measure(None, ["1", "flip"], ["1", "flip"], [8], torch.device("cpu"), log=lambda s: None,
                                     **limits)
    assert [(r["queries_from"], r["db_views"], r["query_views"]) for r in records] == [
        ("held-out", d, q) for d in ("1", "flip") for q in ("1", "flip")] + [
        ("test", d, q) for d in ("1", "flip") for q in ("1", "flip")]
    held_out, test = records[:4], records[4:]
    assert {(r["queries"], r["database"]) for r in held_out} == {(50, 250)}
    assert {(r["queries"], r["database"], r["setting"]) for r in test} == {(60, 300, "D/8")}
    plain = accuracy_resolution.measure(None, [28], [8], torch.device("cpu"), log=lambda s: None, **limits)[0]
    assert test[0]["top1"] == pytest.approx(plain["top1"])
    assert test[1]["query_mflops"] == pytest.approx(2 * plain["query_mflops"])
    assert all(0 <= r["top1"] <= 100 and 0 <= r["vote10_top1"] <= 100 for r in records)
    with pytest.raises(ValueError, match="unknown view sets"):
        view_averaging.measure(None, ["mirror"], ["1"], [8], torch.device("cpu"), log=lambda s: None, **limits)
