"""`gateway --workers N`: the supervisor of N worker processes and its fleet-wide admin API."""
