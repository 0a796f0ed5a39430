"""Running jobs on an instance: start (job_runner), watch (process_monitor), collect
(result_handler). Every function takes a `RemoteRunner` (an SSH connection)."""
