# Chapter 06: the mean score of a random vector against itself rotated by a distance r, normalised by its
# squared norm: how fast RoPE decorrelates distant positions for two bases.
# Data: 06_rotary_position_embedding/decay.dat, "distance base10000 base500000".
load 'style.gp'

data = datadir.'/06_rotary_position_embedding/decay.dat'
set title 'Score of a vector with itself, r positions apart (mean of 64 random vectors, d = 128)'
set xlabel 'distance r (tokens)'
set ylabel 'q · R_r q / |q|^2'
set logscale x 2
set xrange [1 : 65536]
set xtics ('1' 1, '8' 8, '64' 64, '512' 512, '4K' 4096, '32K' 32768)
set yrange [-0.2 : 1.05]
set key top right
set arrow 1 from graph 0, first 0 to graph 1, first 0 nohead linecolor rgb '#bdbdbd'
plot data using 1 : 2 with lines linetype 3 title 'base 10,000', \
     data using 1 : 3 with lines linetype 1 title 'base 500,000'
