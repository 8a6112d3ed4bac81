"""Export a list of U-Net members as ONE fused ONNX graph (uint8 NHWC in, (B, M, H, W) probs out)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.net import FusedEnsemble, UNet
from service.fsutil import sha256_file

OPSET = 17


def export_ensemble(members: list[UNet], path: Path, *, tile: int = 256, features=None) -> str:
    """Write the fused ensemble to ``path`` (atomically) and return its sha256. With ``features``
    (``models.novelty.FeatureStats``) the graph also outputs ``novelty`` and ``embedding``."""
    path = Path(path)
    model = FusedEnsemble([m.cpu().eval() for m in members], features).eval()
    outputs = ["member_probs"] + (["novelty", "embedding"] if features is not None else [])
    example = torch.zeros((1, tile, tile, 3), dtype=torch.uint8)
    tmp = path.with_name(path.name + ".part")
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={
                "image": {0: "batch", 1: "height", 2: "width"},
                "member_probs": {0: "batch", 2: "height", 3: "width"},
                **(
                    {
                        "novelty": {0: "batch", 2: "cells_y", 3: "cells_x"},
                        "embedding": {0: "batch", 2: "cells_y", 3: "cells_x"},
                    }
                    if features is not None
                    else {}
                ),
            },
            opset_version=OPSET,
            dynamo=False,
        )
    tmp.replace(path)
    return sha256_file(path)
