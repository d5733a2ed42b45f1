"""The two sets of weights verify compares: the checkpoint's, and the artifact's as the shipped decoder rebuilds them.

The decoded weights come through the emitted tiny decoder (squeeze emit-decoder), imported from a temporary file,
not through squeeze.load: verify then proves the code the user ships beside the artifact.
"""
import importlib.util
import tempfile
from pathlib import Path

from .. import decoder
from ..errors import FormatError, SqueezeError
from ..loader import read_artifact


def check_same_tensors(artifact_path, checkpoint_path, checkpoint: dict) -> None:
    """The artifact holds exactly the checkpoint's tensor names, with the same shapes; else one line naming the
    first difference of each kind."""
    tensors = read_artifact(artifact_path).tensors
    slices = {name for t in tensors for name in t.get("stack", ())}  # format 1.3: parts of a stack, not tensors
    stored = {t["name"]: list(t["shape"]) for t in tensors if t["name"] not in slices}
    only_artifact = [n for n in stored if n not in checkpoint]
    only_checkpoint = [n for n in checkpoint if n not in stored]
    if only_artifact or only_checkpoint:
        parts = []
        if only_artifact:
            parts.append(f"'{only_artifact[0]}' is only in the artifact" + _more(only_artifact))
        if only_checkpoint:
            parts.append(f"'{only_checkpoint[0]}' is only in {checkpoint_path}" + _more(only_checkpoint))
        raise SqueezeError(f"{artifact_path}: tensor names differ from the checkpoint: {'; '.join(parts)}")
    for name, shape in stored.items():
        if shape != list(checkpoint[name].shape):
            raise SqueezeError(f"{artifact_path}: tensor '{name}' has shape {shape} but {list(checkpoint[name].shape)} "
                               f"in {checkpoint_path}")


def _more(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def decode_with_shipped_decoder(artifact_path) -> dict:
    """{name: tensor} from the decoder that `squeeze emit-decoder` writes for this artifact."""
    path = str(artifact_path)
    source = decoder.emit_for(path)  # also checks every section's CRC
    with tempfile.TemporaryDirectory(prefix="squeeze-verify-") as tmp:
        file = Path(tmp) / "squeeze_tiny_decoder.py"
        file.write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location("squeeze_tiny_decoder", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    try:
        return module.squeeze_load(path)
    except ValueError as e:  # the tiny decoder reports damage as ValueError("squeeze: ...")
        raise FormatError(f"{path}: the emitted decoder refused it ({e})") from None


def mirrored(original: dict, decoded: dict) -> dict:
    """{name: 2·W − Ŵ}: the checkpoint's weights W moved by the artifact's error Ŵ − W in the opposite direction
    (float32; tensors that are not floating point as the artifact has them). Scoring W + E and W − E and averaging
    cancels every odd-order term of the loss change in E, the first-order one g·E above all: on a model whose
    validation gradient g is not zero (small, under- or over-trained), that term is as likely negative as positive
    for a given error pattern and can be many times the curvature term a quantizer controls (verify --mirror)."""
    out = {}
    for name, w_hat in decoded.items():
        w = original[name]
        if w_hat.is_floating_point():
            out[name] = (2 * w.float() - w_hat.float()).reshape(w_hat.shape)
        else:
            out[name] = w_hat
    return out
