"""Finetuner's CLIP flow with kubetune, on a cluster: fit → stream_logs → metrics → save_artifact → encode.

    export KUBECONFIG=...                       # a cluster with the kubetune operator
    export KUBETUNE_S3_ENDPOINT=http://...      # S3/MinIO as this machine sees it
    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
    python examples/finetuner_flow.py [--model ViT-B-32::laion2b_s34b_b79k] [--gpus 1]

Without --model it fine-tunes the quickstart's tiny model on the bundled data (uploaded to S3 first).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kubetune
import yaml
from kubetune import EvaluationCallback, WiSEFTCallback

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="open_clip name[::pretrained] (default: the tiny model)")
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()

    options: dict = {"gpus": args.gpus, "epochs": args.epochs}
    if args.model is None:  # the quickstart's tiny config: trains in a minute on a CPU
        quickstart = yaml.safe_load((HERE / "quickstart.yaml").read_text())["spec"]
        options.update(model_config=quickstart["model"]["config"], learning_rate=1e-3, batch_size=32,
                       warmup_steps=4, num_workers=0)
    run = kubetune.fit(
        model=args.model or "kubetune-tiny",
        train_data=str(HERE / "data" / "train.csv"),
        eval_data=str(HERE / "data" / "eval.csv"),
        callbacks=[EvaluationCallback(limit=10), WiSEFTCallback(alpha=0.9)],
        **options,
    )
    print(f"created {run.namespace}/{run.name}")
    for line in run.stream_logs():
        print(line)
    run.wait()
    print(run.metrics())
    artifact = run.save_artifact(f"{run.name}-model")
    text_model = kubetune.get_model(artifact, select_model="clip-text")
    image_model = kubetune.get_model(artifact, select_model="clip-vision")
    texts = kubetune.encode(text_model, ["a red circle on a white background"])
    images = kubetune.encode(image_model, [str(HERE / "data" / "images" / "eval-00000.png")])
    print("text", texts.shape, "image", images.shape, "similarity", float(texts[0] @ images[0]))


if __name__ == "__main__":
    main()
