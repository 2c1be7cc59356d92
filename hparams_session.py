"""A training run as one trial of TensorBoard's HParams dashboard, written into the run's own event file: the
experiment's configuration (its hyperparameters, the main ones first, with their domains, and its metrics), the
session's start (this run's values) and its end. The metrics' values are scalars under ``SESSION_GROUP``/ that the
run logs itself (``Run.close``); the HParams plugin reads them from there.
"""
from __future__ import annotations

import argparse
import time

from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp

from config import TENSORBOARD_LEFT_OUT, get_args_parser

# the columns the HParams table opens with, in this order
HPARAMS_FIRST = ("model", "dataset", "loss", "text_encoder", "learning_rate", "batch_size", "seed", "weight_decay",
                 "num_iters")
SESSION_GROUP = "session"  # the scalar tag group of the session metrics: sorted after 'loss' and 'lr'
# the session metrics: the headline test recall@k of the final and of the best evaluation (runlog.headline_recall)
SESSION_METRICS = tuple((f"{SESSION_GROUP}/test_R@{k}_{which}", f"test R@{k} ({which})")
                        for k in (1, 10) for which in ("final", "best"))


def hparams_of(args: argparse.Namespace) -> dict:
    """The run's settings for the HParams table: the main ones first, then every other flag (but
    ``config.TENSORBOARD_LEFT_OUT``); booleans, numbers and strings as they are, anything else (a list, None) as its text."""
    values = {k: v for k, v in vars(args).items() if k not in TENSORBOARD_LEFT_OUT}
    values["text_encoder"] = (f"bert {values.get('bert_model')}" if values.get("use_bert")
                              else f"lstm {values.get('lstm_dim')}")
    ordered = {k: values[k] for k in HPARAMS_FIRST if k in values}
    ordered.update({k: v for k, v in values.items() if k not in ordered})
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in ordered.items()}


def _domain(value, choices) -> hp.Domain | None:
    """Booleans: Discrete([False, True]) (shown as true / false); a string flag with choices: those choices."""
    if isinstance(value, bool):
        return hp.Discrete([False, True])
    if isinstance(value, str) and choices and all(isinstance(c, str) for c in choices) and value in choices:
        return hp.Discrete(list(choices))
    return None


def trial_summaries(args: argparse.Namespace, trial_id: str) -> list[summary_pb2.Summary]:
    """The experiment's configuration and this session's start (``trial_id``): the HParam of every setting
    (``hparams_of``; domains from the types and main.py's choices) and the metrics ``SESSION_METRICS``."""
    choices = {a.dest: a.choices for a in get_args_parser()._actions if a.choices}
    values = hparams_of(args)
    hparams = [hp.HParam(name, _domain(value, choices.get(name))) for name, value in values.items()]
    metrics = [hp.Metric(tag, display_name=title) for tag, title in SESSION_METRICS]
    config = hp.hparams_config_pb(hparams=hparams, metrics=metrics)
    start = hp.hparams_pb({h: values[h.name] for h in hparams}, trial_id=trial_id)
    return [config, start]


def session_end_summary(status: int = api_pb2.STATUS_SUCCESS) -> summary_pb2.Summary:
    """The session's end (``status``: api_pb2.STATUS_SUCCESS, ...), at the current time."""
    data = plugin_data_pb2.HParamsPluginData(
        version=metadata.PLUGIN_DATA_VERSION,
        session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time()))
    value = summary_pb2.Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(data),
                                      tensor=metadata.NULL_TENSOR)
    return summary_pb2.Summary(value=[value])
