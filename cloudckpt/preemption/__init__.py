"""Preemption detection for spot / preemptible VMs.

Cloud providers give a short warning before they reclaim a spot or
preemptible machine:

* **GCE** sends an ACPI soft-off (processes receive ``SIGTERM``) and sets the
  metadata value ``instance/preempted`` to ``TRUE``; the VM is hard-stopped
  about 30 s later
  (https://cloud.google.com/compute/docs/instances/spot#preemption-process).
* **AWS** posts a two-minute spot interruption notice on the instance metadata
  endpoint ``latest/meta-data/spot/instance-action`` (404 until then)
  (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html).
* **Azure** sends no SIGTERM before evicting a Spot VM: the notice is a
  Scheduled Event (``Preempt``, at least 30 s ahead; ``Terminate``, ``Reboot``,
  ``Redeploy`` stop the VM too, ``Freeze`` only pauses it) for this VM on the
  instance metadata service, ``/metadata/scheduledevents``
  (https://learn.microsoft.com/en-us/azure/virtual-machines/linux/scheduled-events,
  https://learn.microsoft.com/en-us/azure/virtual-machines/instance-metadata-service).

:class:`PreemptionWatcher` watches any combination of these sources
(``"sigterm"``, ``"gce"``, ``"aws"``, ``"azure"``); it only uses the standard library and
never imports TensorFlow.  The package has one module per concept:

* :mod:`.notice` -- :class:`PreemptionNotice`, deadlines per source, and the
  process-wide :func:`was_preempted` / :func:`last_notice`;
* :mod:`.signals` -- the SIGTERM rules, in short: the first SIGTERM the
  watcher's own handler receives is a notice and does not terminate the
  process (a metadata notice before it does not count); a replaced Python
  handler is then called; the second SIGTERM, and every SIGTERM once the
  watcher stopped, behaves exactly as the replaced disposition (``SIG_DFL``
  terminates by the signal, exit 143; ``SIG_IGN`` ignores; a callable is
  called); :meth:`PreemptionWatcher.stop` restores it, in any stop order of
  nested watchers; SIGINT is never touched;
* :mod:`.metadata` -- the GCE, AWS and Azure pollers;
* :mod:`.watcher` -- :class:`PreemptionWatcher`: the first notice, later
  notices tightening :attr:`PreemptionWatcher.hard_stop_at`, callbacks,
  start/stop.

Metadata base URLs can be given explicitly, or through the environment
variables ``CLOUDCKPT_GCE_METADATA_URL``, ``CLOUDCKPT_AWS_METADATA_URL`` and
``CLOUDCKPT_AZURE_METADATA_URL``
(useful to point a subprocess at a local fake server).
"""

from __future__ import annotations

from .metadata import (
    AWS_METADATA_URL_ENV,
    AZURE_METADATA_URL_ENV,
    DEFAULT_AWS_METADATA_URL,
    DEFAULT_AZURE_METADATA_URL,
    DEFAULT_GCE_METADATA_URL,
    GCE_METADATA_URL_ENV,
)
from .notice import DEFAULT_DEADLINES, SOURCES, PreemptionNotice, _reset_last_notice, last_notice, was_preempted
from .watcher import PreemptionWatcher

__all__ = [
    "AWS_METADATA_URL_ENV",
    "AZURE_METADATA_URL_ENV",
    "DEFAULT_AWS_METADATA_URL",
    "DEFAULT_AZURE_METADATA_URL",
    "DEFAULT_DEADLINES",
    "DEFAULT_GCE_METADATA_URL",
    "GCE_METADATA_URL_ENV",
    "SOURCES",
    "PreemptionNotice",
    "PreemptionWatcher",
    "last_notice",
    "was_preempted",
]
