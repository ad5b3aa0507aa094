import json
from pathlib import Path

from vlmdiff.config import ConfigError, load_schema, validate_config

try:
    validate_config(config, load_schema(Path(workflow.basedir) / "schemas/config.schema.yaml"))
except ConfigError as err:
    raise WorkflowError(f"invalid config: {err}") from None

ENV = "../envs/vlmdiff.yaml"
RUN = config["run"]
R = f"results/{RUN}"
LOGS = f"{R}/logs"
BENCH = f"{R}/benchmarks"
WORLD_SPLITS = ["train", "val", "spatial", "ocr", "vsr", "corpus"]


def world_file(split):
    return f"{R}/world/{split}.parquet"


def all_targets():
    return [
        f"{R}/world/summary.json",
        f"{R}/models/vlm_eval.csv",
        f"{R}/models/vlm_eval.png",
    ]
