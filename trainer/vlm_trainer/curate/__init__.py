"""The curate stage: filters, deduplication, balancing and the funnel report."""
