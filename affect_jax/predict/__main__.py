r"""Predictions of a trained run on your own images, folders of images and videos.

  python -m affect_jax.predict --workdir=runs/resnet50 --output=preds.csv \
      photos/ selfie.jpg interview.mp4

Every face found gets a row (see the README's "Predict on your own images"); the flags below
choose the checkpoint, how faces are found and cropped, and how videos are sampled.
"""

from affect_jax.predict import cli

cli.run()
