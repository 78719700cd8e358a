"""The export-job engine shared by every source.

- windows.py: where a stream's range comes from and how it is cut into windows;
- http.py: where API calls are paced and retried;
- export_job.py: the lifecycle (create -> poll -> file URL -> download), and where we wait;
- download.py: where files are fetched whole, without API credentials;
- csv_records.py: where a CSV cell becomes a typed value;
- scheduler.py: where exports run in parallel;
- stream.py: where windows move the bookmark;
- fast_output.py: RECORD messages written straight to stdout;
- batch_files.py and parallel_batches.py: BATCH files, a large export's written by worker processes;
- collector.py: the garbage collector's settings while rows stream through.
"""
