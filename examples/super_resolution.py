"""Super-resolution by ILVR: sample images whose down-sampled version is a given low-resolution image. No retraining.

    python examples/super_resolution.py --model path/to/saved_pipeline --image low_res.png --num-images 4

The reference's size times the factor (default: inferred) must be the model's resolution, e.g. a 4x4 image for an
8x8 model. --until 0.5 follows the reference for the first half of the steps only (more freedom, looser match).
"""

import argparse

import torch
from PIL import Image

from ddpm_components import DDPMPipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="saved pipeline folder or Hub repo id")
parser.add_argument("--image", required=True, help="the low-resolution reference image")
parser.add_argument("--factor", type=int, default=None, help="the up-sampling factor N (default: inferred)")
parser.add_argument(
    "--until", type=float, default=None, help="fraction of the steps that follow the reference"
)
parser.add_argument("--steps", default="1000", help="denoising steps, or a respacing string such as ddim100")
parser.add_argument("--num-images", type=int, default=4)
parser.add_argument("--out", default="upsampled.png")
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(args.model)
reference = Image.open(args.image)
results = pipe(
    reference_image=reference,
    reference_factor=args.factor,
    reference_until=args.until,
    batch_size=args.num_images,
    num_inference_steps=int(args.steps) if args.steps.isdigit() else args.steps,
    generator=[torch.Generator().manual_seed(i) for i in range(args.num_images)],
).images
size = results[0].size
grid = Image.new(results[0].mode, (size[0] * (len(results) + 1), size[1]))
grid.paste(reference.convert(results[0].mode).resize(size, Image.Resampling.NEAREST), (0, 0))
for column, picture in enumerate(results, start=1):
    grid.paste(picture, (column * size[0], 0))
grid.save(args.out)
print(f"wrote {args.out}: the reference (nearest up-sampling), then {len(results)} results")
