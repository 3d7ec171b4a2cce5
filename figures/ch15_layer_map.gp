# Chapter 15: which layer's cache each layer of Gemma 3n E4B reads. A layer that keeps its own cache reads itself
# (on the diagonal); the sharing layers read the last sliding or full layer before them.
# Data: 15_cross_layer_kv/layer_map.dat, rows "layer source kind(0 sliding, 1 full) owns(1 keeps a cache)".
load 'style.gp'

data = datadir.'/15_cross_layer_kv/layer_map.dat'
set terminal svg enhanced size 820, 360 font 'sans-serif,13' background rgb 'white'
set output outfile
set title 'Gemma 3n E4B: the cache each layer reads'
set xlabel 'layer'
set ylabel 'layer whose cache it reads'
set xrange [-1 : 35]
set yrange [-1 : 20.5]
set xtics 0, 5, 34
set ytics 0, 2, 20
set key top left font ',11'
plot data using 1 : ($4 == 1 && $3 == 0 ? $2 : 1/0) with points linetype 1 pointsize 1.1 title 'sliding, keeps its cache', \
     data using 1 : ($4 == 1 && $3 == 1 ? $2 : 1/0) with points linetype 2 pointsize 1.3 title 'full, keeps its cache', \
     data using 1 : ($4 == 0 && $3 == 0 ? $2 : 1/0) with points linetype 1 pointtype 6 pointsize 1.1 title 'sliding, reads an earlier sliding layer', \
     data using 1 : ($4 == 0 && $3 == 1 ? $2 : 1/0) with points linetype 2 pointtype 4 pointsize 1.3 title 'full, reads an earlier full layer'
