"""Shadow evaluation: `psad shadow run` re-scores the service's sampled lists with the teacher of the
same bundle version and writes how far the served student agrees (docs/shadow.md).

The record format, stream keys and sampling rule are export.contract.shadow's; results.py is the
on-disk layout the report reads.
"""
