"""How records leave the tap, one module per output path (stream.py picks one per stream and file):

- the Singer SDK's own RECORD messages (the SDK, through sdk_adapter.py);
- fast_records.py: RECORD messages written straight to stdout;
- jsonl_batches.py: BATCH files written in this process;
- parallel_batches.py: a large export's BATCH files written by worker processes;
- collector.py: the garbage collector's settings while rows stream through.
"""
