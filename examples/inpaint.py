"""Inpainting (RePaint): repaint the white pixels of a mask, keep the black ones exactly. No retraining.

    python examples/inpaint.py --model path/to/saved_pipeline --image digit.png --mask mask.png
    python examples/inpaint.py --model path/to/saved_pipeline --image digit.png --steps 1000 --jump-n-sample 1  # plain

White in the mask is repainted, black is kept (diffusers' Stable Diffusion inpainting convention; diffusers'
RePaintPipeline uses the opposite). Without --mask the bottom half is repainted. The mask is resized to the model's
resolution with nearest-neighbour sampling and thresholded at 0.5. The defaults here, 100 steps with RePaint's
resampling 10 / 10 (910 U-Net calls), did best on the digits for the cost of 1000 plain steps (docs/pipeline.md).
"""

import argparse

import torch
from PIL import Image

from ddpm_components import DDPMPipeline
from ddpm_components.pipeline_ddpm import standardize_pil_image

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="saved pipeline folder or Hub repo id")
parser.add_argument("--image", required=True, help="the input image file")
parser.add_argument("--mask", default=None, help="the mask file (white = repaint); default: the bottom half")
parser.add_argument("--steps", default="100", help="denoising steps, or a respacing string such as ddim100")
parser.add_argument("--jump-length", type=int, default=10)
parser.add_argument("--jump-n-sample", type=int, default=10)
parser.add_argument("--num-images", type=int, default=4)
parser.add_argument("--out", default="inpainted.png")
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(args.model)
channels, height, width = (
    pipe.unet.config.in_channels,
    pipe.unet.config.sample_size,
    pipe.unet.config.sample_size,
)
with Image.open(
    args.image
) as opened:  # EXIF orientation, 16-bit greyscale and transparency as everywhere else
    image = standardize_pil_image(opened, "L" if channels == 1 else "RGB").resize(
        (width, height), Image.Resampling.LANCZOS
    )
if args.mask is None:
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 2 :, :] = 1.0  # white = repaint
else:
    mask = Image.open(args.mask)

results = pipe(
    image=image,
    mask_image=mask,
    batch_size=args.num_images,
    num_inference_steps=int(args.steps) if args.steps.isdigit() else args.steps,
    jump_length=args.jump_length,
    jump_n_sample=args.jump_n_sample,
    generator=[torch.Generator().manual_seed(i) for i in range(args.num_images)],
).images
grid = Image.new(results[0].mode, (width * (len(results) + 1), height))
for column, picture in enumerate([image, *results]):
    grid.paste(picture, (column * width, 0))
grid.save(args.out)
print(f"wrote {args.out}: the input, then {len(results)} results ({pipe.num_timesteps} U-Net calls each)")
