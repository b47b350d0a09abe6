"""Image-to-image (SDEdit): noise an image to the level `strength`, then denoise it with a DDPM.

    python examples/image_to_image.py --model path/to/saved_pipeline --image photo.png --strength 0.5

Small strengths keep the layout of the input and change details; strength 1 starts from (almost) pure
noise. The image is read like every image in ddpm-components (standardize_pil_image: EXIF orientation,
16-bit greyscale, transparency on black), resized to the model's resolution and converted to its channels.
"""

import argparse

import torch
from PIL import Image

from ddpm_components import DDPMPipeline
from ddpm_components.pipeline_ddpm import standardize_pil_image

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="saved pipeline folder or Hub repo id")
parser.add_argument("--image", required=True, help="the input image file")
parser.add_argument("--strength", type=float, default=0.5, help="in (0, 1]: how much of the schedule to run")
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--out", default="edited.png")
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(args.model)
size = pipe.unet.config.sample_size
mode = "L" if pipe.unet.config.in_channels == 1 else "RGB"
with Image.open(
    args.image
) as opened:  # EXIF orientation, 16-bit greyscale and transparency as everywhere else
    init = standardize_pil_image(opened, mode).resize((size, size), Image.Resampling.LANCZOS)

result = pipe(
    image=init,
    strength=args.strength,
    num_inference_steps=args.steps,
    generator=torch.Generator().manual_seed(0),
).images[0]
result.save(args.out)
print(f"wrote {args.out} (strength {args.strength}: {pipe.num_timesteps} of {args.steps} steps)")
