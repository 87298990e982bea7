"""`diffcascade load`: replay a trace or Poisson arrivals against any cascade entry URL.

`schedule` turns a trace or a rate into arrival times, `client` sends them (open loop, bounded
in-flight), `report` summarises the records and `plots` draws them.
"""
