"""Load a saved DDPM pipeline (a folder or a Hub repo id) and sample a grid of images.

    python examples/load_and_sample.py --model path/to/saved_pipeline --num-images 16 --steps 1000

`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` works without ddpm-components installed
(it runs the pipeline and component code stored with the model); with ddpm-components installed,
`DDPMPipeline.from_pretrained(...)` loads the same folder with the installed code instead.
"""

import argparse
import math

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="saved pipeline folder or Hub repo id")
parser.add_argument("--num-images", type=int, default=16)
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="samples.png")
args = parser.parse_args()

pipe = DiffusionPipeline.from_pretrained(args.model, trust_remote_code=True)
pipe.to("cuda" if torch.cuda.is_available() else "cpu")

generator = torch.Generator().manual_seed(args.seed)  # same seed, same images
images = pipe(batch_size=args.num_images, num_inference_steps=args.steps, generator=generator).images

columns = math.ceil(math.sqrt(len(images)))
rows = math.ceil(len(images) / columns)
images += [Image.new(images[0].mode, images[0].size)] * (rows * columns - len(images))  # pad with black tiles
make_image_grid(images, rows=rows, cols=columns).convert(images[0].mode).save(args.out)
print(f"wrote {args.out}")
