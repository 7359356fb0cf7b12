"""Converts checkpoints between Hugging Face directories and jaxdistill Orbax checkpoints.

  python tools/convert_checkpoint.py --from_hf=HF_DIR --to_orbax=CKPT_DIR
  python tools/convert_checkpoint.py --from_orbax=CKPT_DIR --to_hf=HF_DIR [--tokenizer=DIR]

CKPT_DIR may also be a training workdir (its latest checkpoint is used) or one step's
directory. Long-trace SFT of Qwen2.5-Math needs its 4,096-position limit raised at import:
  --rope_theta=300000 --max_position_embeddings=32768
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdistill import checkpoint, hf, sharding, storage  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("from_hf", None, "Hugging Face directory (config.json + *.safetensors).")
flags.DEFINE_string("to_orbax", None, "Orbax checkpoint root to create.")
flags.DEFINE_string("from_orbax", None, "Orbax checkpoint root, step directory, or workdir.")
flags.DEFINE_string("to_hf", None, "Hugging Face directory to create.")
flags.DEFINE_string("tokenizer", None, "Tokenizer directory to copy into --to_hf.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                  "Parameter dtype to store (default: as in the source).")
flags.DEFINE_float("rope_theta", None, "Override rope_theta on import.")
flags.DEFINE_integer("max_position_embeddings", None, "Override max positions on import.")
flags.DEFINE_integer("step", None, "Step to export (default: latest).")
flags.DEFINE_list("mesh", ["1", "-1", "1", "1"], "data,fsdp,context,tp mesh to load onto (-1 = rest).")
flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard written, in GiB.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --to_hf directory.")


def main(argv):
  del argv
  hf_import = bool(FLAGS.from_hf or FLAGS.to_orbax)
  hf_export = bool(FLAGS.from_orbax or FLAGS.to_hf)
  if hf_import == hf_export or (hf_import and not (FLAGS.from_hf and FLAGS.to_orbax)) or (
      hf_export and not (FLAGS.from_orbax and FLAGS.to_hf)):
    raise app.UsageError("give either --from_hf and --to_orbax, or --from_orbax and --to_hf")
  try:  # gs:// paths: reachable, or a message saying what to change
    for flag in ("from_hf", "from_orbax", "tokenizer"):
      if getattr(FLAGS, flag):
        storage.check_reachable(getattr(FLAGS, flag), what=f"--{flag}")
    for flag in ("to_orbax", "to_hf"):
      if getattr(FLAGS, flag):
        storage.check_reachable(getattr(FLAGS, flag), writable=True, what=f"--{flag}")
  except ValueError as e:
    raise app.UsageError(str(e))
  mesh = sharding.make_mesh([int(x) for x in FLAGS.mesh])
  if hf_import:
    if storage.exists(FLAGS.to_orbax) and storage.listdir(FLAGS.to_orbax):
      raise app.UsageError(f"--to_orbax={FLAGS.to_orbax} exists and is not empty")
    overrides = {k: getattr(FLAGS, k) for k in ("rope_theta", "max_position_embeddings")
                 if getattr(FLAGS, k) is not None}
    if FLAGS.dtype:
      overrides["param_dtype"] = FLAGS.dtype
    model = hf.load_hf_model(FLAGS.from_hf, mesh, **overrides)
    path = checkpoint.save_model(FLAGS.to_orbax, model)
    logging.info("wrote %s (%s, %d parameters)", path, model.config.model_type,
                 model.config.num_params())
    print(f"wrote {path}")
  else:
    model = checkpoint.load_model(FLAGS.from_orbax, mesh, step=FLAGS.step)
    hf.save_hf_model(model, FLAGS.to_hf, dtype=FLAGS.dtype, tokenizer_dir=FLAGS.tokenizer,
                     max_shard_bytes=int(FLAGS.max_shard_gb * 2**30),
                     overwrite=FLAGS.overwrite)
    print(f"wrote {FLAGS.to_hf}")


if __name__ == "__main__":
  app.run(main)
