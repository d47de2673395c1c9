"""Environments beyond the built-in shop, for ARMAP and its planners.

See `flywheel.synthesis.environment` for the protocol they implement.
"""
