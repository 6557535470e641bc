"""The advisor: estimate (memory and step time of a candidate, nothing loaded), and later probe, search and
calibrate. Import from the submodules; this package keeps no state and imports nothing heavy."""

from lowres.advisor.estimate import Calibration, Candidate, Estimate, estimate, largest_fitting_batch

__all__ = ["Calibration", "Candidate", "Estimate", "estimate", "largest_fitting_batch"]
