"""BlinkDL's `rwkv` package (the independent reference), loaded for RWKV-7 on CPU in float32."""
import os

os.environ["RWKV_V7_ON"] = "1"          # must be set before rwkv.model is imported
os.environ.setdefault("RWKV_JIT_ON", "0")

import torch  # noqa: E402
from rwkv.model import RWKV  # noqa: E402


def reference_model(pth_path):
    """Load `NAME.pth` with the reference (it takes the name without the extension)."""
    return RWKV(str(pth_path)[: -len(".pth")], strategy="cpu fp32")


def reference_logits(ref, tokens):
    """Logits [T, V] for every position of one token sequence."""
    with torch.no_grad():
        out, _ = ref.forward(list(tokens), None, full_output=True)
    return out.float().reshape(len(tokens), -1)
