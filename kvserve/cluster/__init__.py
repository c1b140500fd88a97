"""Several engine replicas behind one OpenAI-compatible endpoint, on Ray Serve (`kvserve serve
--replicas N`), routed by what each replica's prefix cache really holds. Needs the `cluster`
extra (ray[serve]); nothing else in kvserve imports this package.
"""
