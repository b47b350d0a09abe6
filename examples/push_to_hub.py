"""Share a saved pipeline on the Hugging Face Hub, loadable by anyone with one line of diffusers.

    hf auth login            # or: export HF_TOKEN=hf_...
    python examples/push_to_hub.py --model path/to/saved_pipeline --repo-id your-name/ddpm-digits

The repository gets the remote-code layout (pipeline_ddpm.py, unet/unet_ddpm.py, scheduler/scheduling_ddpm.py
next to the weights) and a model card with a sample grid and the training configuration, so that
`DiffusionPipeline.from_pretrained("your-name/ddpm-digits", trust_remote_code=True)` works without
ddpm-components. The command line does the same: `ddpm-components push --model ... --repo-id ...`.
"""

import argparse
import json
from pathlib import Path

from ddpm_components import DDPMPipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="saved pipeline folder")
parser.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
parser.add_argument("--private", action="store_true")
args = parser.parse_args()

pipe = DDPMPipeline.from_pretrained(args.model)
config_file = Path(args.model) / "training_config.json"
training_config = json.loads(config_file.read_text()) if config_file.is_file() else None

url = pipe.push_to_hub(
    args.repo_id,
    private=args.private or None,
    training_config=training_config,  # shown in the model card
    num_sample_images=16,  # the card's sample grid
    sample_inference_steps=100,
)
print(f"pushed: {url}")
