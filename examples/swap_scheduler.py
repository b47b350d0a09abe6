"""Use ddpm-components' DDPMScheduler inside an existing diffusers pipeline.

    python examples/swap_scheduler.py --model google/ddpm-cifar10-32 --steps 1000

Our scheduler reads diffusers' DDPMScheduler config keys, so `from_config` carries every setting over;
it then drives diffusers' own DDPMPipeline (and DDIMPipeline, after construction) unchanged.
"""

import argparse

import torch
from diffusers import DDPMPipeline

from ddpm_components import DDPMScheduler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument(
    "--model", default="google/ddpm-cifar10-32", help="a diffusers DDPMPipeline folder or repo id"
)
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--out", default="swapped.png")
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(args.model)  # diffusers' pipeline, U-Net and scheduler
original = pipe.scheduler
pipe.scheduler = DDPMScheduler.from_config(original.config)  # ours, same configuration

image = pipe(num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)).images[0]
image.save(args.out)
print(f"wrote {args.out} with {type(pipe.scheduler).__module__}.{type(pipe.scheduler).__name__}")

# swapping back restores the original configuration (keys our scheduler lacks are kept hidden in its config)
pipe.scheduler = type(original).from_config(pipe.scheduler.config)
