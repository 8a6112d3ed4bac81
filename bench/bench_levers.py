"""Graph-level speed levers for the shipped ensemble, each timed against it and checked for equivalence.

    .venv/bin/python bench/bench_levers.py [--rounds 7] [--variants int8 int8-deep] [--out DIR]

Variants of ``models/baseline/ensemble.onnx`` (built into ``--out``, default bench/results/levers):

- ``fp32-again``: the shipped graph in a second session, the noise control;
- ``int8``: static QDQ int8 (onnxruntime.quantization, per-channel int8 weights, uint8 activations,
  MinMax calibration on the model's own ``replay.npz``, never the holdout), every Conv and
  ConvTranspose but the 1x1 logit heads;
- ``int8-deep``: the same with the full-resolution level (``down.0``, ``up.2``, ``dec.2``) kept in
  float, where int8 convolutions of 8 channels are slower than float ones;
- ``probs-only``: ``models.export.export_ensemble`` of the members (``members.pt``) without the novelty
  features: the shipped graph less ``novelty`` and ``embedding`` (its member probabilities equal the
  shipped ones bit for bit), the speed reference for the member_probs-only variants below;
- ``groupnorm-op``: the same members through the dynamo exporter at opset 21, every GroupNorm ONE
  ``GroupNormalization`` node (ORT 1.32 has no CPU kernel for it and inlines its function body);
- ``grouped``: the five members fused horizontally into one network (``GroupedEnsemble``: groups=5
  convolutions and transposed convolutions, GroupNorm(20, 40), per-member skip concatenation by
  reshape), torchscript exporter as shipped;
- ``frozen-norm``: the members with every GroupNorm frozen into a BatchNorm whose running statistics
  are the GroupNorm inputs' per-channel mean and variance on ``replay.npz`` (calibrated layer by layer),
  which ONNX Runtime folds into the convolutions: the only way to fold the shipped weights' norms;
- ``batchnorm-probe``: a **speed probe, not a lever**: the same members with every GroupNorm swapped
  for a BatchNorm (GroupNorm's scale and shift, unit running statistics), exported as shipped.
  ONNX Runtime folds each BatchNorm into its convolution. Its outputs are not the model's (its
  equivalence row shows by how much); it prices what a model retrained with foldable
  normalisation would cost to serve, which only retraining and the protocol's gates could ship.
  ``--write-probe-model DIR`` writes it as a whole model directory, for
  ``bench/bench_monai.py --model DIR`` (its ratios against MONAI with foldable normalisation).

Speed: seconds per ``session.run`` on batches of 2 and 8 holdout tiles, every variant in turn,
alternating order, medians, as ratios to the shipped graph (one run, one machine: load hits all alike).
Equivalence on the 32 tiles of the frozen holdout (``holdout.npz``): max and 99.9th-percentile
|difference| of member probabilities, of the mean probability and of every uncertainty measure, of
novelty and embedding; pixels whose label (p >= 0.5) flips; Dice against the masks and its change
(the gate: |Δ Dice| <= 0.005); an output a variant lacks shows "–". Needs the ``train`` extra (onnx, and
torch for the last three variants).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.inference.ensemble import Ensemble  # noqa: E402
from service.inference.evaluation import dice  # noqa: E402
from service.inference.uncertainty import all_measures  # noqa: E402

if TYPE_CHECKING:
    from torch import nn

    from models.net import UNet

MODEL = ROOT / "models" / "baseline"
FULL_RESOLUTION = ("/down.0/", "/up.2", "/dec.2/")  # node-name prefixes of the 8-channel level
VARIANTS = (
    "fp32-again",
    "int8",
    "int8-deep",
    "probs-only",
    "groupnorm-op",
    "grouped",
    "frozen-norm",
    "batchnorm-probe",
)


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    """The session the service itself would make of ``path`` (service.inference.ensemble.Ensemble)."""
    return Ensemble(path, path.stem, providers=["CPUExecutionProvider"], threads=threads).session


def quantise_int8(src: Path, out: Path, calibration: np.ndarray, *, keep_full_resolution: bool) -> Path:
    """Static QDQ int8 of ``src``'s convolutions (logit heads excluded), calibrated on ``calibration``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Tiles(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i : i + 4]} for i in range(0, len(calibration), 4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    prepared = out.with_name(out.stem + "-pre.onnx")
    quant_pre_process(str(src), str(prepared), auto_merge=True)
    convs = [n for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Conv", "ConvTranspose")]
    excluded = [n.name for n in convs if n.name.startswith("/head")]
    if keep_full_resolution:
        excluded += [n.name for n in convs if n.name.startswith(FULL_RESOLUTION)]
    quantize_static(
        str(prepared),
        str(out),
        Tiles(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "ConvTranspose"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    prepared.unlink()
    return out


def members() -> list[UNet]:
    """The shipped ensemble's members (eval mode, CPU) from ``members.pt``."""
    from models.fit import load_members

    return load_members(MODEL / "members.pt")[0]


@cache
def _grouped_class() -> type[nn.Module]:
    """``GroupedEnsemble``, defined on first use: torch is a training-only dependency."""
    import torch
    from torch import nn

    from models.net import normalise, unet_pass

    def cat0(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach() for t in tensors]).clone()

    def fused_block(blocks: list[nn.Sequential], shared_input: bool) -> nn.Sequential:
        """Member blocks (Conv, GroupNorm, ReLU, Conv, GroupNorm, ReLU) as one grouped block."""
        m, first = len(blocks), blocks[0]
        w, c_in, groups = first[0].out_channels, first[0].in_channels, 1 if shared_input else m
        convs = (
            nn.Conv2d(c_in * groups, w * m, 3, padding=1, bias=False, groups=groups),
            nn.Conv2d(w * m, w * m, 3, padding=1, bias=False, groups=m),
        )
        norms = tuple(nn.GroupNorm(n.num_groups * m, w * m, n.eps) for n in (first[1], first[4]))
        for k, (conv, norm) in enumerate(zip(convs, norms, strict=True)):
            conv.weight.data = cat0([b[3 * k].weight for b in blocks])
            norm.weight.data = cat0([b[3 * k + 1].weight for b in blocks])
            norm.bias.data = cat0([b[3 * k + 1].bias for b in blocks])
        return nn.Sequential(convs[0], norms[0], nn.ReLU(), convs[1], norms[1], nn.ReLU())

    class GroupedEnsemble(nn.Module):
        """The members as one network, channels member-major (member m owns [m*C, (m+1)*C)); the fused
        ensemble's probs-only output (B, M, H, W)."""

        def __init__(self, members: list[UNet]) -> None:
            super().__init__()
            self.m = m = len(members)
            self.down = nn.ModuleList(
                fused_block([u.down[i] for u in members], shared_input=i == 0) for i in range(len(members[0].down))
            )
            self.pool = nn.MaxPool2d(2)
            self.up, self.dec = nn.ModuleList(), nn.ModuleList()
            for j, first in enumerate(members[0].up):
                up = nn.ConvTranspose2d(first.in_channels * m, first.out_channels * m, 2, stride=2, groups=m)
                up.weight.data = cat0([u.up[j].weight for u in members])  # (C_in*M, C_out, 2, 2)
                up.bias.data = cat0([u.up[j].bias for u in members])
                self.up.append(up)
                self.dec.append(fused_block([u.dec[j] for u in members], shared_input=False))
            self.head = nn.Conv2d(members[0].head.in_channels * m, m, 1, groups=m)
            self.head.weight.data = cat0([u.head.weight for u in members])
            self.head.bias.data = cat0([u.head.bias for u in members])

        def join(self, upsampled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
            """Each member's upsampled channels, then its skip channels: groups stay contiguous."""
            b, _, h, w = upsampled.shape
            pairs = torch.cat([upsampled.reshape(b, self.m, -1, h, w), skip.reshape(b, self.m, -1, h, w)], dim=2)
            return pairs.reshape(b, -1, h, w)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            logits, _ = unet_pass(self, normalise(image.permute(0, 3, 1, 2).float() / 255.0), self.join)
            return torch.sigmoid(logits)

    return GroupedEnsemble


def grouped_ensemble(members: list[UNet]) -> nn.Module:
    """The ``grouped`` variant's torch module (eval mode)."""
    return _grouped_class()(members).eval()


def export_grouped(path: Path) -> Path:
    """``grouped_ensemble`` of the shipped members, exported as ``models.export`` exports (torchscript, opset 17)."""
    import torch

    from models.export import OPSET

    tmp = path.with_name(path.name + ".part")
    with torch.no_grad():
        torch.onnx.export(
            grouped_ensemble(members()),
            (torch.zeros((1, 256, 256, 3), dtype=torch.uint8),),
            str(tmp),
            input_names=["image"],
            output_names=["member_probs"],
            dynamic_axes={
                "image": {0: "batch", 1: "height", 2: "width"},
                "member_probs": {0: "batch", 2: "height", 3: "width"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    return tmp.replace(path)


def export_groupnorm_op(path: Path) -> Path:
    """The probs-only ensemble through the dynamo exporter at opset 21: one ``GroupNormalization`` per GroupNorm."""
    import torch

    from models.net import FusedEnsemble

    batch = torch.export.Dim("batch")
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # its progress lines stay off the tables
        program = torch.onnx.export(
            FusedEnsemble(members()).eval(),
            (torch.zeros((2, 256, 256, 3), dtype=torch.uint8),),
            None,
            input_names=["image"],
            output_names=["member_probs"],
            dynamic_shapes={"image": {0: batch}},
            opset_version=21,
            dynamo=True,
            optimize=True,
        )
    tmp = path.with_name(path.name + ".part")
    program.save(str(tmp))
    return tmp.replace(path)


def batchnorm_members(members: list[UNet]) -> list[UNet]:
    """Copies of ``members`` as ``UNet(norm="batch")``, each BatchNorm2d carrying its GroupNorm's affine
    parameters (running mean 0, variance 1): the same graph shape with a normalisation the exporter
    can fold."""
    from models.net import UNet

    out = []
    for member in members:
        probe = UNet(base=member.down[0][0].out_channels, depth=len(member.up), norm="batch")
        missing, unexpected = probe.load_state_dict(member.state_dict(), strict=False)
        assert not unexpected and all(
            k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in missing
        )
        out.append(probe.eval())
    return out


def frozen_norm_members(members: list[UNet], images: np.ndarray, batch: int = 8) -> list[UNet]:
    """``batchnorm_members`` whose running statistics are each member's own GroupNorm inputs on
    ``images``, layer by layer (each layer calibrated with the layers before it already frozen): the
    per-tile statistics GroupNorm computes replaced by fixed per-channel ones, so the norm folds."""
    import torch
    from torch import nn

    from models.net import to_input

    out = []
    for probe in batchnorm_members(members):
        for layer in [m for m in probe.modules() if isinstance(m, nn.BatchNorm2d)]:
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average over every batch
            layer.train()
            with torch.no_grad():
                for i in range(0, len(images), batch):
                    probe(to_input(images[i : i + batch]))
            layer.eval()
        out.append(probe.eval())
    return out


def export_frozen_norm(path: Path) -> Path:
    from models.export import export_ensemble

    export_ensemble(frozen_norm_members(members(), np.load(MODEL / "replay.npz")["images"]), path)
    return path


def export_batchnorm_probe(path: Path) -> Path:
    from models.export import export_ensemble

    export_ensemble(batchnorm_members(members()), path)
    return path


def write_probe_model(out: Path) -> Path:
    """The batchnorm probe as a whole model directory that ``load_ensemble`` serves and bench_monai.py
    runs in torch: ``members.pt`` (recipe norm "batch"), ``ensemble.onnx`` with the novelty and
    embedding outputs (statistics fitted on ``replay.npz``: a speed probe needs their shape, not their
    calibration), and the shipped card with the new digest. Speed only: its outputs are another model's."""
    import json
    import shutil

    import torch

    from models.export import export_ensemble
    from models.fit import load_members
    from models.novelty import fit_features

    out.mkdir(parents=True, exist_ok=True)
    for name in ("holdout.npz", "replay.npz"):
        shutil.copyfile(MODEL / name, out / name)
    shipped, ckpt = load_members(MODEL / "members.pt")
    probes = batchnorm_members(shipped)
    torch.save(
        {**ckpt, "recipe": {**ckpt["recipe"], "norm": "batch"}, "members": [p.state_dict() for p in probes]},
        out / "members.pt",
    )
    sha = export_ensemble(
        probes, out / "ensemble.onnx", features=fit_features(probes, np.load(out / "replay.npz")["images"])
    )
    card = json.loads((MODEL / "card.json").read_text())
    card.update(
        sha256=sha,
        version=f"batchnorm-probe-{sha[:12]}",
        architecture=card["architecture"] + "; SPEED PROBE: GroupNorm swapped for BatchNorm",
    )
    (out / "card.json").write_text(json.dumps(card, indent=2))
    return out


def export_probs_only(path: Path) -> Path:
    from models.export import export_ensemble

    export_ensemble(members(), path)
    return path


def build_variants(names: list[str], out_dir: Path) -> dict[str, Path]:
    """Each requested variant's ONNX file (built once into ``out_dir``)."""
    calibration = np.load(MODEL / "replay.npz")["images"]
    builders: dict[str, Callable[[Path], Path]] = {
        "fp32-again": lambda _: MODEL / "ensemble.onnx",
        "int8": lambda p: quantise_int8(MODEL / "ensemble.onnx", p, calibration, keep_full_resolution=False),
        "int8-deep": lambda p: quantise_int8(MODEL / "ensemble.onnx", p, calibration, keep_full_resolution=True),
        "probs-only": export_probs_only,
        "groupnorm-op": export_groupnorm_op,
        "grouped": export_grouped,
        "frozen-norm": export_frozen_norm,
        "batchnorm-probe": export_batchnorm_probe,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = out_dir / f"{name}.onnx"
        paths[name] = path if path.exists() else builders[name](path)
        print(f"variant {name}: {paths[name]}", file=sys.stderr, flush=True)
    return paths


def outputs(sess: ort.InferenceSession, images: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(None, {"image": images[i : i + 8]}) for i in range(0, len(images), 8)]
    return {name: np.concatenate([r[j] for r in runs]) for j, name in enumerate(names)}


def differences(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.float64) - b)
    return f"{d.max():.4f} / {np.percentile(d, 99.9):.4f}"


def equivalence(ref: dict, got: dict, masks: np.ndarray) -> dict[str, str]:
    """Max / 99.9th-percentile |difference| of every output and map, label flips, Δ Dice; "–" for an
    output only one side has."""
    m_ref = all_measures(ref["member_probs"].transpose(1, 0, 2, 3))  # (M, B, H, W)
    m_got = all_measures(got["member_probs"].transpose(1, 0, 2, 3))
    row = {"member probs": differences(got["member_probs"], ref["member_probs"])}
    row.update({name: differences(m_got[name], m_ref[name]) for name in m_ref})
    for name in ("novelty", "embedding"):
        if name in ref or name in got:
            row[name] = differences(got[name], ref[name]) if name in ref and name in got else "–"
    labels_ref, labels = m_ref["probability"] >= 0.5, m_got["probability"] >= 0.5
    row["label flips"] = f"{100 * np.mean(labels != labels_ref):.3f} %"
    row["Δ Dice"] = f"{dice(labels, masks) - dice(labels_ref, masks):+.5f}"
    return row


def timings(sessions: dict[str, ort.InferenceSession], tiles: np.ndarray, rounds: int) -> dict[str, float]:
    """Median seconds per run of each session, in alternating order."""
    feed = {"image": np.ascontiguousarray(tiles)}
    for s in sessions.values():
        s.run(None, feed)
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(rounds):
        for name in list(sessions) if r % 2 == 0 else list(sessions)[::-1]:
            t0 = time.perf_counter()
            sessions[name].run(None, feed)
            seconds[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "levers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--write-probe-model", type=Path, metavar="DIR", help="write the batchnorm probe as a model dir and stop"
    )
    args = ap.parse_args(argv)
    if args.write_probe_model:
        print(write_probe_model(args.write_probe_model))
        return 0
    holdout = np.load(MODEL / "holdout.npz")
    images, masks = holdout["images"], holdout["masks"] > 0
    paths = {"shipped": MODEL / "ensemble.onnx", **build_variants(args.variants, args.out)}
    sessions = {name: session(path, args.threads) for name, path in paths.items()}
    speed = {batch: timings(sessions, images[:batch], args.rounds) for batch in (2, 8)}
    ref = outputs(sessions["shipped"], images)
    rows = {name: equivalence(ref, outputs(sessions[name], images), masks) for name in args.variants}
    print(f"{args.rounds} alternating rounds, {args.threads} threads; equivalence on the {len(images)} holdout tiles")
    print()
    print("| variant | batch 2 s | speed vs shipped | batch 8 s | speed vs shipped |")
    print("|---|---|---|---|---|")
    for name in paths:
        b2, b8 = speed[2][name], speed[8][name]
        print(f"| {name} | {b2:.3f} | {speed[2]['shipped'] / b2:.2f}× | {b8:.3f} | {speed[8]['shipped'] / b8:.2f}× |")
    print()
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    print("| variant | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(row.get(c, "–") for c in columns) + " |")
    print("\nmax / 99.9th percentile of |difference| against the shipped graph; Δ Dice gate: |Δ| <= 0.005")
    print("probs-only (shipped less novelty and embedding) is the speed reference for the member_probs-only variants")
    if "batchnorm-probe" in paths:
        print("batchnorm-probe is a speed probe of another model (not equivalent by construction), never a lever")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
