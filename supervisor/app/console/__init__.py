"""The web console, served by the daemon under /ui on the admin listener (app/http.py mounts
it): overview, jobs, one job's story, report. Templates and static files live beside this
module and ship in the wheel; nothing is fetched from elsewhere."""
