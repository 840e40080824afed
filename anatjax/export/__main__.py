r"""Export a run's encoder for PyTorch / timm.

  python -m anatjax.export --workdir=RUN --out=encoder.safetensors
  python -m anatjax.export --workdir=RUN --step=1000 --which=student --format=npz \
      --out=encoder.npz

--format=timm writes a safetensors state dict for `timm.create_model(...)` with
strict=True (the exact call is printed and stored in the metadata); --format=npz writes
big_vision's layout for timm's `model.load_pretrained(path)`. Both write FILE.json beside
(method, step, config, image size, channels, normalisation). Needs NumPy + safetensors
only: torch and timm are not imported. An LD run exports its whole U-Net for the
reference module anatjax/export/ld_unet_torch.py (anatjax/export/unet.py); a DrasCLR run
its query encoder and atlas for anatjax/export/drasclr_torch.py (anatjax/export/cnn3d.py).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from anatjax import export

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (its checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step. Default: the newest.")
_WHICH = flags.DEFINE_enum("which", "auto", ["auto", "teacher", "student", "query", "key"],
                           "Which encoder: auto = the method's choice (the EMA teacher of AFiRe "
                           "and DINO, MAE's only encoder, DrasCLR's query encoder f_q); "
                           "DrasCLR also has key (the momentum encoder).")
_FORMAT = flags.DEFINE_enum("format", "timm", list(export.FORMATS),
                            "timm: .safetensors state dict for timm; npz: big_vision .npz.")
_OUT = flags.DEFINE_string("out", None, "The file to write (the sidecar is OUT.json).")
flags.mark_flags_as_required(["workdir", "out"])


def usage(info: dict, out: str, fmt: str) -> str:
  """What the command prints: what it wrote and the PyTorch lines that load it."""
  if info["format"] == "anatjax-ld-unet":
    return "\n".join([
        f"Wrote the LD U-Net (stage {info['stage']}, step {info['step']}) to {out} and "
        f"{out}.json.",
        "Load it in PyTorch:",
        "  import anatjax.export.ld_unet_torch, safetensors.torch",
        f"  model = {info['torch_create_model']}",
        f"  model.load_state_dict(safetensors.torch.load_file({out!r}), strict=True)",
        f"Input: {info['input']}. Transfer: {info['transfer']}."])
  if info["format"] == "anatjax-drasclr-encoder":
    return "\n".join([
        f"Wrote DrasCLR's {info['which']} encoder (step {info['step']}) with its atlas "
        f"({info['num_locations']} locations, {info['patch_size']}^3 patches at "
        f"{info['spacing_mm']} mm) to {out} and {out}.json.",
        "Load it in PyTorch:",
        "  import anatjax.export.drasclr_torch",
        f"  encoder, atlas = anatjax.export.drasclr_torch.load_drasclr({out!r})",
        f"Input: {info['input']}."])
  if info["format"] == "anatjax-swin3d-encoder":
    convention = info["input"]
    return "\n".join([
        f"Wrote {info['method']}'s {info['which']} Swin encoder (step {info['step']}) in "
        f"MONAI's SwinUNETR.swinViT layout to {out} and {out}.json.",
        "Fine-tune it in MONAI:",
        "  import monai, safetensors.torch",
        f"  net = {info['monai_create_model']}",
        f"  net.load_state_dict(safetensors.torch.load_file({out!r}), strict=False)",
        f"Input: Orientationd(axcodes={convention['axcodes']!r}), "
        f"Spacingd(pixdim={tuple(convention['pixdim'])}), {convention['intensity']}."])
  size = info["image_size"]
  lines = [
      f"Wrote the {info.get('which', '')} encoder of step {info.get('step')} "
      f"({info.get('method')}, {info.get('variant')}, {size} px, {info['channels']} "
      f"channel(s)) to {out} and {out}.json.",
      "Load it in PyTorch:",
      "  import timm" + (", safetensors.torch" if fmt == "timm" else ""),
      f"  model = {info['timm_create_model']}",
  ]
  if fmt == "timm":
    lines.append(f"  model.load_state_dict(safetensors.torch.load_file({out!r}), strict=True)")
  else:
    lines.append(f"  model.load_pretrained({out!r})")
  lines += [
      f"Input: greyscale scaled to [0, 1], replicated to {info['channels']} channel(s), "
      f"normalised with mean={info['mean']} std={info['std']}, at {size} px.",
      "Features: model.forward_features(x) gives [CLS, patch tokens] after the final norm; "
      "for fine-tuning, average the patch tokens: add global_pool='avg', fc_norm=False.",
  ]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax's INFO chatter; --verbosity=0 shows it
  try:
    info = export.export_run(_WORKDIR.value, _OUT.value, step=_STEP.value,
                             which=_WHICH.value, format=_FORMAT.value)
  except (FileNotFoundError, ValueError) as e:
    print(f"anatjax.export: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(usage(info, _OUT.value, _FORMAT.value), flush=True)


if __name__ == "__main__":
  app.run(main)
