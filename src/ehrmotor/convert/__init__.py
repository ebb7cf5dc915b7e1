"""Models from elsewhere into ehrmotor: `convert_femr` (femr model folders) and what runs them."""
