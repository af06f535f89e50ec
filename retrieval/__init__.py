"""Query encoding with nested submodels, search, funnel, budget selection and evaluation."""
