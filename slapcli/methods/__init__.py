"""Selection methods, one room each: `registry` lists them and what each needs, `base` holds what they share
(the job, the chosen rows), `simple`, `baselines` and `slap` the methods themselves, `pool` the replay's pools."""
