"""The export lifecycle, with no Singer SDK in it: what the tap asks of an API and how it waits.

- job.py: the values (request, handle, ready export), the errors, and `ExportApi`, which each source
  implements to say how its API spells create, poll, file URL and download;
- runner.py: the lifecycle written once (create -> poll -> file URL -> download whole);
- status_board.py: one listing of statuses shared by every export waiting on an API that lists them;
- scheduler.py: where exports run in parallel, and one partition's exports in window order;
- windows.py: where a stream's range comes from and how it is cut into windows;
- http.py and pacing.py: where API calls are retried, and where they wait for the API's budget;
- download.py: where files are fetched whole, without API credentials.
"""
