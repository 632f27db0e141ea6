"""The quickstart: synthetic shapes data, tiny stage-0 components, the example jobs and their evaluation."""
