"""Feast definitions of the streamrec feature store (`feast apply` in this folder registers them).

The objects are built from the platform config this folder was rendered for (`platform.yaml` next to
this file; in the source tree's template folder, $STREAMREC_CONFIG or the embedded profile), so the
windows, sequence length and lake paths always match what the feature job writes.
"""

from pathlib import Path

from features.definitions import feast_objects
from features.repo import platform_config_for

globals().update(feast_objects(platform_config_for(Path(__file__).resolve().parent)))
