-- Run by the postgres image on its first start only (an empty data volume): one database per
-- service, named as in deploy/compose.env. The migrations would create them too when missing.
CREATE DATABASE hseshop_orders;
CREATE DATABASE hseshop_payments;
CREATE DATABASE hseshop_gateway;
