"""Let torchvision 0.28 import beside the CPU build of torch 2.13 (a test-environment fix only).

That torchvision's compiled ops need CUDA, so they do not load; its ``_meta_registrations.py`` then
registers fake kernels for ops that do not exist and the import fails with "operator
torchvision::nms does not exist". This makes those registrations conditional on the ops being
loaded, in the virtual environment the scripts create. Idempotent.
"""
import importlib.util
from pathlib import Path

OLD = '@torch.library.register_fake("torchvision::'
NEW = '@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))("torchvision::'


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if OLD in text:
        path.write_text(text.replace(OLD, NEW))


if __name__ == "__main__":
    main()
