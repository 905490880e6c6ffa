"""``milkit benchmark speed``: time and memory per bag of every MIL model (Sm issue, "Speed benchmark").

For each model and bag size N (instances × ``dim`` features on a ⌈√N⌉-wide patch grid,
so that Sm models get their 8-neighbour graph): forward+backward time of one training
step, inference time (eval, no grad), the time to build the graph (edge list and Â's CSR
form), and the peak resident memory of the process. The child sets the C allocator as
milkit's training processes do (``malloc.keep_freed_memory``; both libraries profit). Every (model, N) runs in its own subprocess with ``--threads``
torch threads, so that one crash or time-out does not end the table. When ``torchmil``
is importable, its counterpart runs in the same subprocess on the same bag, step for
step interleaved with milkit's (alternating which goes first), and the ratio is the
median of the per-round ratios: on a shared machine both sides of a ratio see the same
load. ``--check`` exits 1 when a goal of issue 15 is missed (:func:`check_goals`).

Timings depend on the machine's load: the load average before and after is reported.
Models with quadratic self-attention (SmTAP) are skipped above ``--quadratic-max``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import typer

#: label → (registry model name, config overrides); paper defaults otherwise
MILKIT_MODELS: dict[str, tuple[str, dict]] = {
    "abmil": ("abmil", {"gated": False}),
    "abmil_gated": ("abmil", {"gated": True}),
    "smap_early": ("smap", {"sm_where": "early"}),
    "smap_mid": ("smap", {"sm_where": "mid"}),
    "smap_late": ("smap", {"sm_where": "late"}),
    "smtap": ("smtap", {}),
    "clam_sb": ("clam_sb", {}),
    "clam_mb": ("clam_mb", {}),
    "dsmil": ("dsmil", {}),
    "transmil": ("transmil", {}),
    "dtfd": ("dtfd", {}),
    "pseudo_label": ("smoothed_instance", {}),  # issue 11's recipe: its labelling model, one instance model
                                                # (Sm on features + logits) per default feature α, averaged
}
QUADRATIC = {"smtap"}
#: milkit label → torchmil class and the arguments that make it the same model
TORCHMIL_MODELS: dict[str, str] = {
    "abmil": "ABMIL",
    "abmil_gated": "ABMIL",
    "smap_early": "SmABMIL",
    "smap_mid": "SmABMIL",
    "smap_late": "SmABMIL",
    "smtap": "SmTransformerABMIL",
    "clam_sb": "CLAM_SB",
    "dsmil": "DSMIL",
    "transmil": "TransMIL",
    "dtfd": "DTFDMIL",
}


def torchmil_available() -> bool:
    return find_spec("torchmil") is not None


# -- the child process ---------------------------------------------------------------
def _grid_coords(n: int):
    import numpy as np

    side = math.ceil(math.sqrt(n))
    k = np.arange(n)
    return np.stack([k % side, k // side], axis=1) * 256


def _build_milkit(label: str, dim: int):
    from milkit.models.factory import build_mil_model, model_config
    from milkit.nn.encoders import EncoderConfig

    name, over = MILKIT_MODELS[label]
    if label == "pseudo_label":  # the default recipe labels with the mean of two scales (methods/pseudo_label.py)
        from milkit.methods.pseudo_label import PseudoLabelConfig, ScaleMeanMIL

        enc = EncoderConfig(name="identity", in_dim=dim)
        return ScaleMeanMIL([build_mil_model(model_config({"name": name, **over, "feature_alpha": a}), enc)
                             for a in PseudoLabelConfig().feature_alpha_grid])
    return build_mil_model(model_config({"name": name, **over}), EncoderConfig(name="identity", in_dim=dim))


#: how a torchmil counterpart still differs from milkit's model after the arguments below
TORCHMIL_DIFFERENCES: dict[str, str] = {
    "dtfd": "torchmil's tier-1/2 attention is not gated",
    "transmil": "torchmil's Nyström attention has no output projection and no residual depthwise conv",
    "clam_sb": ("torchmil's gated attention has no dropout (milkit: CLAM's 0.25 on both gates; its fc dropout "
                "is given to torchmil's feat_ext); the instance loss (SmoothTop1SVM) is not in the timed step"),
}


def _build_torchmil(label: str, dim: int):
    """torchmil's model with the arguments that make it milkit's paper-default architecture."""
    import torch.nn as nn
    import torchmil.models as tm

    emb = lambda: nn.Sequential(nn.Linear(dim, 512), nn.GELU())  # noqa: E731 - SmAP/SmTAP's embedding
    fc = lambda: nn.Sequential(nn.Linear(dim, 512), nn.ReLU())  # noqa: E731 - CLAM's fc, DTFD's reduction
    if label in ("abmil", "abmil_gated"):
        return tm.ABMIL(in_shape=(dim,), gated=label == "abmil_gated")
    if label.startswith("smap"):
        return tm.SmABMIL(in_shape=(dim,), sm_where=label.split("_")[1], spectral_norm=True, feat_ext=emb())
    if label == "smtap":
        return tm.SmTransformerABMIL(in_shape=(dim,), feat_ext=emb(), transf_n_layers=2, transf_n_heads=8,
                                     transf_use_mlp=False, pool_spectral_norm=True)
    if label == "clam_sb":  # CLAM's fc: Linear, ReLU, Dropout(0.25) (CLAM code with --drop_out)
        feat = nn.Sequential(nn.Linear(dim, 512), nn.ReLU(), nn.Dropout(0.25))
        return tm.CLAM_SB(in_shape=(dim,), att_dim=256, gated=True, k_sample=8, feat_ext=feat)
    if label == "dsmil":
        return tm.DSMIL(in_shape=(dim,), nonlinear_q=True)
    if label == "transmil":
        return tm.TransMIL(in_shape=(dim,), n_heads=8, n_landmarks=256, dropout=0.1, feat_ext=fc())
    if label == "dtfd":
        return tm.DTFDMIL(in_shape=(dim,), n_groups=4, feat_ext=fc())
    raise ValueError(label)


def _peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry over the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    import resource  # pragma: no cover - not Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _make_runner(lib: str, label: str, n: int, dim: int, x, graph):
    """(model, run) where ``run()`` returns the bag logits of one forward pass."""
    import torch

    if lib == "milkit":
        model = _build_milkit(label, dim)

        def run():
            return model(x, None, [graph]).bag_logits
        return model, run
    model = _build_torchmil(label, dim)
    adj = graph.normalized_adjacency().to_sparse_coo().unsqueeze(0) if label.startswith("sm") else None
    mask = torch.ones(1, n)

    def run():
        if label == "transmil":
            out = model(x)
        elif adj is not None:
            out = model(x, adj, mask)
        else:
            out = model(x, mask)
        return out[0] if isinstance(out, tuple) else out
    return model, run


def _child(spec: dict) -> dict:
    """Time every library of ``spec['libs']`` on the same bag, interleaved round by round, so
    that a ratio compares steps taken under the same machine load."""
    import torch

    from milkit.data.graph import grid_adjacency
    from milkit.malloc import keep_freed_memory
    from milkit.nn.dnnl import onednn_enabled
    from milkit.nn.smooth import SparseOperator

    kept = keep_freed_memory()  # the allocator setting of milkit's training processes (engine.fit_stage), both sides
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    n, dim, label = spec["n"], spec["dim"], spec["model"]
    libs = spec.get("libs") or [spec["lib"]]
    x = torch.randn(1, n, dim)
    t0 = time.perf_counter()
    graph = grid_adjacency(_grid_coords(n), 256)
    SparseOperator.from_graph(graph)  # Â's CSR form: built once per graph, part of building it
    graph_s = time.perf_counter() - t0
    base = _peak_rss_mb()
    runners = {lib: _make_runner(lib, label, n, dim, x, graph) for lib in libs}

    def train_step(lib):
        model, run = runners[lib]
        model.train()
        model.zero_grad(set_to_none=True)
        run().sum().backward()

    def infer_step(lib):
        model, run = runners[lib]
        model.eval()
        with torch.no_grad():
            run()

    # wall time, and the process's CPU time: with one thread the CPU time is the compute
    # itself, and hardly moves when other processes share the cores (wall time does)
    out: dict = {lib: {"fwd_bwd": [], "infer": [], "fwd_bwd_cpu": [], "infer_cpu": [], "fwd_bwd_warmup": [],
                       "fwd_bwd_faults": []} for lib in libs}
    for kind, step in (("fwd_bwd", train_step), ("infer", infer_step)):
        for _ in range(spec["warmup"]):
            for lib in libs:
                t = time.perf_counter()
                step(lib)
                if kind == "fwd_bwd":
                    out[lib]["fwd_bwd_warmup"].append(time.perf_counter() - t)
        r = 0
        while r < spec["repeats"] or min(sum(out[lib][kind]) for lib in libs) < spec["min_time"]:
            for lib in (libs if r % 2 == 0 else libs[::-1]):  # alternate who goes first
                f0, c, t = _minor_faults(), time.process_time(), time.perf_counter()
                step(lib)
                out[lib][kind].append(time.perf_counter() - t)
                out[lib][f"{kind}_cpu"].append(time.process_time() - c)
                if kind == "fwd_bwd":
                    out[lib]["fwd_bwd_faults"].append(_minor_faults() - f0)
            r += 1
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    res = {}
    for lib in libs:
        o = out[lib]
        res[lib] = {"fwd_bwd_s": med(o["fwd_bwd"]), "infer_s": med(o["infer"]), "fwd_bwd_cpu_s": med(o["fwd_bwd_cpu"]),
                    "infer_cpu_s": med(o["infer_cpu"]), "timed": [len(o["fwd_bwd"]), len(o["infer"])],
                    "graph_s": graph_s, "peak_rss_mb": _peak_rss_mb(), "base_rss_mb": base, "keep_freed_memory": kept,
                    "fwd_bwd_warmup_s": o["fwd_bwd_warmup"], "fwd_bwd_all_s": o["fwd_bwd"],
                    "fwd_bwd_minor_faults": o["fwd_bwd_faults"], "torch_threads": torch.get_num_threads(),
                    "onednn_matmul": onednn_enabled()}
    if len(libs) == 2:  # per-round ratios: each compares two steps taken back to back
        a, b = libs
        clock = "_cpu" if spec["threads"] == 1 else ""
        for kind in ("fwd_bwd", "infer"):
            res[f"ratio_{kind}"] = med([u / v for u, v in zip(out[a][kind + clock], out[b][kind + clock])])
            res[f"ratio_{kind}_wall"] = med([u / v for u, v in zip(out[a][kind], out[b][kind])])
        res["ratio_clock"] = "cpu" if clock else "wall"
    return res


def _run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "milkit.benchmarks.speed", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


#: --check goals (issue 15): fwd+bwd time ratio to torchmil, and absolute SmAP-early seconds
RATIO_GOAL = 1.05
RATIO_GOALS = {"smtap": 0.5}
#: (model, N) → seconds for fwd+bwd (+ graph building at 100k)
ABSOLUTE_GOALS = {("smap_early", 10_000): (0.15, False), ("smap_early", 100_000): (1.5, True)}
#: float32 GEMM GFLOP/s of the machine the absolute goals were set on (issue 15: "this machine's ~250 GFLOP/s")
GOAL_MACHINE_GFLOPS = 250.0


def machine_gemm_gflops(threads: int) -> float:
    """This machine's float32 GEMM GFLOP/s now, with ``threads`` torch threads (the absolute goals'
    context: the same code runs ~2× slower on a machine, or in a window, with half the GEMM rate)."""
    import torch

    from milkit.benchmarks.extract import gemm_gflops

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return gemm_gflops()
    finally:
        torch.set_num_threads(before)


def check_goals(results: list[dict], gemm_gflops: float | None = None) -> list[str]:
    """Every goal missed, one line each (empty when all are met); rows without a
    measurement (error, skipped, no torchmil) are not goals met: they are listed too. An absolute
    miss names the machine's GEMM rate (``gemm_gflops``) beside the goal machine's; the goal is not scaled."""
    misses = []
    context = ("" if gemm_gflops is None else
               f" (this machine's float32 GEMM {gemm_gflops:.0f} GFLOP/s; the goal was set at ~{GOAL_MACHINE_GFLOPS:.0f})")
    for r in results:
        m, t, label, n = r["milkit"], r.get("torchmil"), r["model"], r["n"]
        if "skipped" in m:
            continue
        if "error" in m:
            misses.append(f"{label} N={n}: milkit {m['error']}")
            continue
        goal = ABSOLUTE_GOALS.get((label, n))
        if goal is not None:  # CPU seconds with one thread (what a quiet machine's wall clock shows)
            step = m["fwd_bwd_cpu_s"] if r.get("ratio_clock") == "cpu" and "fwd_bwd_cpu_s" in m else m["fwd_bwd_s"]
            secs = step + (m["graph_s"] if goal[1] else 0.0)
            what = "fwd+bwd + graph" if goal[1] else "fwd+bwd"
            if secs > goal[0]:
                misses.append(f"{label} N={n}: {what} {secs:.3f} s > {goal[0]} s{context}")
        if label in TORCHMIL_MODELS:
            limit = RATIO_GOALS.get(label, RATIO_GOAL)
            if t is None or "error" in t or "skipped" in t:
                misses.append(f"{label} N={n}: no torchmil measurement ({(t or {}).get('error', 'not run')})")
            elif r["ratio_fwd_bwd"] > limit:
                misses.append(f"{label} N={n}: fwd+bwd ratio {r['ratio_fwd_bwd']:.2f} > {limit}")
    return misses


# -- the command ---------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "—" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def speed_table(results: list[dict], with_torchmil: bool) -> str:
    head = "| model | N | fwd+bwd s | fwd+bwd CPU s | infer s | peak RSS MB | graph s |"
    sep = "|---|---:|---:|---:|---:|---:|---:|"
    if with_torchmil:
        head += " torchmil fwd+bwd s | torchmil infer s | fwd+bwd ratio | infer ratio |"
        sep += "---:|---:|---:|---:|"
    rows = [head, sep]
    for r in results:
        m, t = r["milkit"], r.get("torchmil")
        if "error" in m or "skipped" in m:
            line = f"| {r['model']} | {r['n']} | {m.get('error') or m.get('skipped')} | | | | |"
        else:
            line = (f"| {r['model']} | {r['n']} | {_fmt(m['fwd_bwd_s'])} | {_fmt(m.get('fwd_bwd_cpu_s'))} | "
                    f"{_fmt(m['infer_s'])} | "
                    f"{m['peak_rss_mb']:.0f} | {_fmt(m['graph_s'])} |")
        if with_torchmil:
            if t is None:
                line += " n/a | | | |"
            elif "error" in t or "skipped" in t:
                line += f" {t.get('error') or t.get('skipped')} | | | |"
            else:
                ok = "error" not in m and "skipped" not in m
                ratio_fb = _fmt(r.get("ratio_fwd_bwd", m["fwd_bwd_s"] / t["fwd_bwd_s"])) if ok else "—"
                ratio_in = _fmt(r.get("ratio_infer", m["infer_s"] / t["infer_s"])) if ok else "—"
                line += f" {_fmt(t['fwd_bwd_s'])} | {_fmt(t['infer_s'])} | {ratio_fb} | {ratio_in} |"
        rows.append(line)
    return "\n".join(rows)


def run_speed(models: list[str], sizes: list[int], dim: int, threads: int, repeats: int, timeout: float,
              quadratic_max: int, torchmil: bool | None, progress=print, min_time: float = 1.0) -> dict:
    """Measure every (model, size); returns the results and the run's context."""
    unknown = [m for m in models if m not in MILKIT_MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(MILKIT_MODELS)}")
    use_tm = torchmil_available() if torchmil is None else torchmil
    if use_tm and not torchmil_available():
        raise ValueError("--torchmil was asked for but torchmil is not installed (pip install milkit[bench])")
    load0 = os.getloadavg()
    gemm0 = machine_gemm_gflops(threads)
    results = []
    for n in sizes:
        for label in models:
            # above 10k: at most 2 timed steps after 2 warm-up steps (a process's first two 100k steps still grow
            # the heap: 25k-200k page faults, up to 3 s of kernel time, issue 15); `--repeats 1` skips the warm-up
            big = n > 10_000
            spec = {"model": label, "n": n, "dim": dim, "threads": threads, "repeats": min(repeats, 2) if big else repeats,
                    "warmup": (0 if repeats == 1 else 2) if big else 1, "min_time": 0.0 if big else min_time}
            row: dict = {"model": label, "n": n}
            libs = ["milkit"] + (["torchmil"] if use_tm and label in TORCHMIL_MODELS else [])
            if label in QUADRATIC and n > quadratic_max:
                row["milkit"] = {"skipped": f"skipped: quadratic attention (N > {quadratic_max})"}
                if len(libs) == 2:
                    row["torchmil"] = {"skipped": "skipped"}
            else:
                got = _run_child({**spec, "libs": libs}, timeout)
                for lib in libs:
                    row[lib] = got.get(lib, got) if "error" not in got else {"error": got["error"]}
                for k in ("ratio_fwd_bwd", "ratio_infer", "ratio_fwd_bwd_wall", "ratio_infer_wall", "ratio_clock"):
                    if k in got:
                        row[k] = got[k]
            progress(row)
            results.append(row)
    return {"results": results, "torchmil": use_tm, "threads": threads, "dim": dim,
            "loadavg_before": load0, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(),
            "gemm_gflops_before": gemm0, "gemm_gflops_after": machine_gemm_gflops(threads)}


def register(app: typer.Typer) -> None:
    """Add ``milkit benchmark speed``."""

    @app.command("speed")
    def speed(
        out: Path = typer.Option(Path("benchmark-results/speed"), help="folder for speed.json and speed.md"),
        sizes: str = typer.Option("1000,10000,100000", help="bag sizes, comma-separated"),
        models: str = typer.Option(",".join(MILKIT_MODELS), help="models, comma-separated"),
        dim: int = typer.Option(512, help="instance feature size"),
        threads: int = typer.Option(2, help="torch threads per measurement"),
        repeats: int = typer.Option(3, help="timed repeats (median) for N <= 10k; at most 2 above (after 2 warm-up steps), and 1 without warm-up with --repeats 1"),
        min_time: float = typer.Option(1.0, help="for N <= 10k, repeat until this many seconds are timed"),
        timeout: float = typer.Option(900.0, help="seconds per (model, size) before giving up"),
        quadratic_max: int = typer.Option(20_000, help="largest N for quadratic-attention models"),
        torchmil: bool = typer.Option(None, "--torchmil/--no-torchmil", help="compare with torchmil (default: if installed)"),
        check: bool = typer.Option(False, "--check", help="exit 1 when a speed goal is missed (by hand, not in CI)"),
    ) -> None:
        """Forward+backward and inference time per bag, and peak memory, for every MIL model."""
        from rich.console import Console

        from milkit import io

        console = Console()
        try:
            size_list = [int(s) for s in sizes.split(",") if s.strip()]
        except ValueError:
            raise typer.BadParameter(f"--sizes must be integers, got {sizes!r}") from None
        model_list = [m.strip() for m in models.split(",") if m.strip()]
        if repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {repeats}")
        if not torchmil_available():
            console.print("torchmil is not installed: reporting milkit's numbers only (pip install milkit[bench])")
        res = run_speed(model_list, size_list, dim, threads, repeats, timeout, quadratic_max, torchmil,
                        progress=lambda r: console.print(json.dumps(r)), min_time=min_time)
        table = speed_table(res["results"], res["torchmil"])
        note = (f"{res['dim']} features, {res['threads']} torch threads, {res['cpu_count']} CPUs; load average "
                f"before {res['loadavg_before'][0]:.2f}, after {res['loadavg_after'][0]:.2f}. "
                f"float32 GEMM (2048², {res['threads']} threads) before {res['gemm_gflops_before']:.0f}, after "
                f"{res['gemm_gflops_after']:.0f} GFLOP/s (the absolute goals were set at ~{GOAL_MACHINE_GFLOPS:.0f}). "
                f"torchmil: {'compared' if res['torchmil'] else 'not installed'}.")
        if res["torchmil"]:
            note += ("\n\ntorchmil models are built with milkit's paper-default architecture where torchmil's "
                     "arguments allow; what still differs: "
                     + "; ".join(f"{k}: {v}" for k, v in TORCHMIL_DIFFERENCES.items()) + ".")
        io.write_json(out / "speed.json", res)
        io.write_text(out / "speed.md", f"# milkit benchmark speed\n\n{note}\n\n{table}\n")
        console.print(table)
        console.print(note)
        if check:
            misses = check_goals(res["results"], min(res["gemm_gflops_before"], res["gemm_gflops_after"]))
            goals = (f"goals: fwd+bwd ≤ {RATIO_GOAL}× torchmil (SmTAP ≤ {RATIO_GOALS['smtap']}×); SmAP-early "
                     "fwd+bwd ≤ 0.15 s at 10k and ≤ 1.5 s with graph building at 100k")
            if misses:
                console.print(f"check FAILED ({goals}):\n" + "\n".join(f"  {m}" for m in misses))
                raise SystemExit(1)  # (typer.Exit would be swallowed by standalone_mode=False)
            console.print(f"check passed ({goals})")


if __name__ == "__main__":  # the per-measurement subprocess
    print(json.dumps(_child(json.loads(sys.argv[1]))))
