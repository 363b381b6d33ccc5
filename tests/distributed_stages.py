"""Run the head and finetune stages in this folder, in a fresh process, on
`--logical-cpus N` logical CPU devices (tf.config.set_logical_device_configuration
must come before TensorFlow starts, hence a process of its own). With TF_CONFIG
in the environment, this process is one worker of a multi-worker run.

    python tests/distributed_stages.py --logical-cpus 2
"""

import argparse
import sys

import tensorflow as tf

from transferlab import cli

parser = argparse.ArgumentParser()
parser.add_argument("--logical-cpus", type=int, default=1)
args = parser.parse_args()
if args.logical_cpus > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)
for stage in ("head", "finetune"):
    code = cli.main([stage])
    if code:
        sys.exit(code)
